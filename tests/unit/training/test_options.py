"""settle_speed_defaults: what --mixed-precision auto and gradient checkpointing resolve to in SFT/RM."""

from __future__ import annotations

import pytest
import torch

from rlhf_kit.training.options import (
    SupervisedOptions,
    TrainingOptions,
    settle_ppo_master_weights,
    settle_speed_defaults,
)


@pytest.fixture
def bf16_gpu(monkeypatch):
    """Pretend one CUDA device with bf16 is present (the resolver only asks these two questions)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def test_auto_on_one_bf16_gpu_picks_master_weights_without_autocast(bf16_gpu):
    opts = SupervisedOptions()
    note = settle_speed_defaults(opts, embedded=False, world_size=1)
    assert (opts.master_weights, opts.mixed_precision) == (True, "no")
    assert opts.gradient_checkpointing is True  # a given model keeps TRL's default
    assert note is not None and "master weights" in note


@pytest.mark.parametrize(
    "change, world",
    [
        ({"lora_r": 8}, 1),  # LoRA: the frozen base stays fp32, autocast does the work
        ({}, 2),  # several processes: FSDP2's mixed-precision policy
        ({"mixed_precision": "bf16"}, 1),  # autocast asked for by name
        ({"mixed_precision": "no"}, 1),  # fp32 asked for by name
    ],
)
def test_auto_leaves_master_weights_off_where_they_do_not_apply(bf16_gpu, change, world):
    opts = SupervisedOptions(**change)
    before = opts.mixed_precision
    assert settle_speed_defaults(opts, embedded=False, world_size=world) is None
    assert opts.master_weights is False
    assert opts.mixed_precision == before


def test_an_fsdp_launch_keeps_its_own_mixed_precision_policy(bf16_gpu, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate/fsdp.yaml, even with one process
    opts = SupervisedOptions()
    assert settle_speed_defaults(opts, embedded=False, world_size=1) is None
    assert (opts.master_weights, opts.mixed_precision) == (False, "auto")


def test_a_launcher_precision_other_than_bf16_is_respected(bf16_gpu, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    opts = SupervisedOptions()
    settle_speed_defaults(opts, embedded=False, world_size=1)
    assert (opts.master_weights, opts.mixed_precision) == (False, "auto")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    settle_speed_defaults(opts, embedded=False, world_size=1)
    assert (opts.master_weights, opts.mixed_precision) == (True, "no")


def test_no_gpu_keeps_fp32_weights_and_the_explicit_flag_still_forces_masters(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    opts = SupervisedOptions()
    settle_speed_defaults(opts, embedded=False, world_size=1)
    assert (opts.master_weights, opts.mixed_precision) == (False, "auto")
    forced = SupervisedOptions(master_weights=True)
    assert settle_speed_defaults(forced, embedded=False, world_size=1) is None  # asked for, no note
    assert (forced.master_weights, forced.mixed_precision) == (True, "no")  # no autocast over bf16 weights


def test_the_embedded_tiny_model_skips_checkpointing_and_ppo_keeps_its_own_defaults():
    opts = SupervisedOptions()
    settle_speed_defaults(opts, embedded=True, world_size=1)
    assert opts.gradient_checkpointing is False
    assert SupervisedOptions().gradient_checkpointing is True
    assert TrainingOptions().gradient_checkpointing is False  # PPO's field is not changed by SFT/RM's


def test_ppo_auto_picks_master_weights_only_where_they_apply(bf16_gpu, monkeypatch):
    opts = TrainingOptions()
    assert settle_ppo_master_weights(opts, "auto", world_size=1, fsdp=False) is not None
    assert opts.master_weights is True
    for precision, world, fsdp, lora in (("bf16", 1, False, 0), ("auto", 2, False, 0), ("auto", 1, True, 0),
                                         ("auto", 1, False, 4)):  # fmt: skip
        other = TrainingOptions(lora_r=lora)
        assert settle_ppo_master_weights(other, precision, world_size=world, fsdp=fsdp) is None
        assert other.master_weights is False, (precision, world, fsdp, lora)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # launched with accelerate/fsdp.yaml
    launched = TrainingOptions()
    assert settle_ppo_master_weights(launched, "auto", world_size=1, fsdp=False) is None
    assert launched.master_weights is False


def test_compile_blocks_auto_compiles_on_one_gpu_only(bf16_gpu, monkeypatch):
    import rlhf_kit.logprobs
    from rlhf_kit.errors import ConfigError
    from rlhf_kit.training.options import resolve_compile_blocks

    monkeypatch.setattr(rlhf_kit.logprobs, "FUSED", None)  # "off" below sets it: restored after the test

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)

    def auto(world=1, fsdp=False, **change):
        return resolve_compile_blocks("auto", TrainingOptions(**change), world_size=world, fsdp=fsdp)

    assert auto() is True
    assert auto(world=2) is False  # several processes: not measured there
    assert auto(fsdp=True) is False
    assert auto(lora_r=8) is False
    assert auto(gradient_checkpointing=True) is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate/fsdp.yaml
    assert auto() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert auto() is False  # CPU: compiling costs more than it saves
    assert resolve_compile_blocks("on", TrainingOptions(), world_size=1, fsdp=False) is True
    assert resolve_compile_blocks("off", TrainingOptions(), world_size=4, fsdp=True) is False
    with pytest.raises(ConfigError, match="auto, on or off"):
        resolve_compile_blocks("yes", TrainingOptions(), world_size=1, fsdp=False)


def test_compile_blocks_off_keeps_the_log_probs_uncompiled_too(monkeypatch):
    """``--compile-blocks off`` keeps ``torch.compile`` out of the whole run: the log-probs' compiled
    function goes off with it; any other choice leaves that function to its default (on CUDA)."""
    import rlhf_kit.logprobs
    from rlhf_kit.training.options import resolve_compile_blocks

    monkeypatch.setattr(rlhf_kit.logprobs, "FUSED", True)  # restored after the test
    resolve_compile_blocks("off", TrainingOptions(), world_size=1, fsdp=False)
    assert rlhf_kit.logprobs.FUSED is False
    for choice in ("on", "auto"):
        monkeypatch.setattr(rlhf_kit.logprobs, "FUSED", False)
        resolve_compile_blocks(choice, TrainingOptions(), world_size=1, fsdp=False)
        assert rlhf_kit.logprobs.FUSED is None
