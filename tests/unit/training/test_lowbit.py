"""--optimizer adamw8bit: the multi-tensor 8-bit AdamW over bf16 weights, its checkpoints and its settings."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from rlhf_kit.errors import ConfigError
from rlhf_kit.training import lowbit_codes
from rlhf_kit.training.checkpoint import load_checkpoint, save_checkpoint
from rlhf_kit.training.lowbit import AdamW8bit, build_8bit_optimizer
from rlhf_kit.training.optim import clip_grad_norm, cosine_schedule
from rlhf_kit.training.options import (
    SupervisedOptions,
    TrainingOptions,
    check_optimizer_choice,
    settle_ppo_master_weights,
    settle_speed_defaults,
)
from rlhf_kit.training.precision import make_optimizer


class Net(nn.Module):
    """A 128 x 64 matrix (32 blocks of 256), a bias and a norm of 128 values (one padded block each), and
    a frozen matrix."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.frozen = nn.Linear(128, 64, bias=False).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.norm(self.proj(x.to(self.proj.weight.dtype))).float())


def _steps(model, opt, n, seed, sched=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = model(torch.randn(16, 64, generator=g)).pow(2).mean()
        loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def test_trainable_weights_become_bf16_with_8bit_moments_and_frozen_ones_stay():
    model = Net()
    opt = build_8bit_optimizer(model, 1e-3, weight_decay=0.1)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert model.frozen.weight.dtype == torch.float32
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert (
        decay[id(model.proj.weight)] == 0.1
        and decay[id(model.proj.bias)] == decay[id(model.norm.weight)] == 0
    )
    _steps(model, opt, 1, seed=0)
    big = opt.state[model.proj.weight]
    assert big["exp_avg_sq"].dtype == torch.uint8 and big["exp_avg_sq"].numel() == 8192
    assert big["exp_avg_sq_scale"].dtype == torch.float32 and big["exp_avg_sq_scale"].numel() == 8192 // 256
    small = opt.state[model.proj.bias]  # 128 values: one block, padded
    assert small["exp_avg"].numel() == 256 and small["exp_avg_scale"].numel() == 1
    assert float(small["step"]) == 1.0 and model.frozen.weight not in opt.state


def _twin_models(dtype=torch.float32):
    a, b = Net(), Net()
    return a.to(dtype), b.to(dtype)


def test_matches_fp32_adamw_up_to_the_quantisation_of_the_moments():
    """fp32 weights (no stochastic rounding): after 5 steps every tensor's distance to torch's AdamW is
    a few percent of the distance AdamW moved it. A wrong bias correction, decay or moment update moves
    it by tens of percent."""
    ours, ref = _twin_models()
    start = [p.detach().clone() for p in ref.parameters()]
    opt = AdamW8bit([p for p in ours.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    _steps(ours, opt, 5, seed=3)
    _steps(ref, ref_opt, 5, seed=3)
    for (name, p), q, q0 in zip(ours.named_parameters(), ref.parameters(), start):
        if p.requires_grad:
            moved = (q - q0).norm()
            assert moved > 0 and (p - q).norm() < 0.05 * moved, name


@pytest.mark.slow
def test_same_codes_and_weights_as_torchaos_per_parameter_adamw8bit():
    """torchao's AdamW8bit (one compiled update per parameter) on the same fp32 matrix and gradients:
    the same 8-bit codes and scales after 4 steps, and weights equal to float rounding. Guards the
    quantisation format and the update order (decay, bias corrections, eps) against the reference."""
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    torch.manual_seed(0)
    ours, ref = nn.Linear(64, 128, bias=False), nn.Linear(64, 128, bias=False)
    ref.load_state_dict(ours.state_dict())
    start = ref.weight.detach().clone()
    opt = AdamW8bit(ours.parameters(), lr=1e-3, weight_decay=0.1)
    ref_opt = TorchaoAdamW8bit(ref.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(16, 64, generator=g)
        for model, o in ((ours, opt), (ref, ref_opt)):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    moved = (ref.weight - start).abs().mean()
    assert (ours.weight - ref.weight).abs().max() < 1e-3 * moved
    for k in ("exp_avg", "exp_avg_sq"):
        theirs = ref_opt.state[ref.weight][k]
        assert torch.equal(opt.state[ours.weight][k], theirs.codes.view(-1)), k
        torch.testing.assert_close(opt.state[ours.weight][f"{k}_scale"], theirs.scale)


def test_chunk_size_does_not_change_the_result():
    """chunk_numel=256 splits the matrix into 32 pieces and updates every tensor on its own; the default
    packs all four into one flat update. Same weights and same state, bit for bit (fp32 weights: no
    random rounding)."""
    a, b = _twin_models()
    trained = [[p for p in m.parameters() if p.requires_grad] for m in (a, b)]
    small = AdamW8bit(trained[0], lr=1e-3, weight_decay=0.1, chunk_numel=256)
    whole = AdamW8bit(trained[1], lr=1e-3, weight_decay=0.1)
    _steps(a, small, 3, seed=4)
    _steps(b, whole, 3, seed=4)
    for p, q in zip(trained[0], trained[1]):
        assert torch.equal(p, q)
        for k, v in small.state[p].items():
            assert torch.equal(v, whole.state[q][k]), k
    for m in (a, b):
        m(torch.randn(4, 64)).pow(2).mean().backward()
    assert [len(pieces) for _, _, pieces in small._chunks()] == [1] * (32 + 3)  # 32 matrix blocks + 3
    assert [len(pieces) for _, _, pieces in whole._chunks()] == [4]


@pytest.mark.slow
def test_the_compiled_update_computes_what_the_eager_one_does():
    """On CUDA the update runs through torch.compile (one graph, symbolic sizes); checked here on CPU
    with fp32 weights against the eager function. Two chunk layouts (a padded tail) share the graph."""
    a, b = _twin_models()
    trained = [[p for p in m.parameters() if p.requires_grad] for m in (a, b)]
    eager = AdamW8bit(trained[0], lr=1e-3, weight_decay=0.1, chunk_numel=4096, compile=False)
    compiled = AdamW8bit(trained[1], lr=1e-3, weight_decay=0.1, chunk_numel=4096, compile=True)
    _steps(a, eager, 2, seed=5)
    _steps(b, compiled, 2, seed=5)
    for p, q in zip(trained[0], trained[1]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        codes = eager.state[p]["exp_avg"], compiled.state[q]["exp_avg"]
        assert (codes[0].int() - codes[1].int()).abs().max() <= 1  # a value on a code boundary may flip


def test_a_parameter_without_gradient_is_left_alone():
    model = Net()
    opt = build_8bit_optimizer(model, 1e-3)
    model(torch.randn(4, 64)).pow(2).mean().backward()
    model.norm.weight.grad = None
    norm_before = model.norm.weight.detach().clone()
    opt.step()
    assert torch.equal(model.norm.weight, norm_before) and model.norm.weight not in opt.state
    assert float(opt.state[model.proj.weight]["step"]) == 1.0


def test_stochastic_rounding_lands_updates_below_bf16_spacing():
    """Weights near 1 have a bf16 spacing of 2^-7 = 0.0078; an Adam step of about lr = 5e-4 rounds to no
    change at all under round-to-nearest. Stochastic rounding moves a matching share of them (about
    lr / spacing = 6%) by one spacing, against the gradient: the update survives in expectation."""
    model = Net()
    with torch.no_grad():
        model.proj.weight.fill_(1.0)
    opt = build_8bit_optimizer(model, 5e-4)
    before = model.proj.weight.detach().clone()
    loss = model(torch.randn(16, 64, generator=torch.Generator().manual_seed(1))).pow(2).mean()
    loss.backward()
    sign = model.proj.weight.grad.float().sign()
    opt.step()
    delta = (model.proj.weight.detach() - before).float()
    moved = (delta != 0).float().mean().item()
    assert 0.02 < moved < 0.15, moved
    along = -(delta * sign).mean().item()  # the step against the gradient, on average over all weights
    assert along == pytest.approx(5e-4, rel=0.35), along


def test_resume_through_a_checkpoint_is_exact(tmp_path):
    """The quantised moments, the tensor learning rate and the RNG of the stochastic rounding all travel
    in save_checkpoint (loaded with weights_only=True): the resumed run equals the uninterrupted one."""
    model = Net()
    opt = build_8bit_optimizer(model, 1e-3, weight_decay=0.01)
    sched = cosine_schedule(opt, 1, 6, 1e-4)
    _steps(model, opt, 3, seed=1, sched=sched)
    save_checkpoint(tmp_path, 3, models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})
    _steps(model, opt, 3, seed=2, sched=sched)

    resumed = Net(seed=7)  # different weights: everything must come from the checkpoint
    ropt = build_8bit_optimizer(resumed, 1e-3, weight_decay=0.01)
    rsched = cosine_schedule(ropt, 1, 6, 1e-4)
    step, _ = load_checkpoint(
        tmp_path, models={"m": resumed}, optimizers={"m": ropt}, schedulers={"m": rsched}
    )
    restored = ropt.state[resumed.proj.weight]
    assert step == 3 and restored["exp_avg"].dtype == torch.uint8  # torch would cast it to the weight's bf16
    assert restored["exp_avg_scale"].dtype == torch.float32
    _steps(resumed, ropt, 3, seed=2, sched=rsched)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert float(ropt.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"]) < 1e-3


def test_make_optimizer_picks_each_kind_and_refuses_bad_pairs():
    assert type(make_optimizer(Net(), 1e-3)).__name__ == "AdamW"
    master = make_optimizer(Net(), 1e-3, master_weights=True)
    assert hasattr(master, "master_weights")
    assert type(make_optimizer(Net(), 1e-3, kind="adamw8bit")) is AdamW8bit
    with pytest.raises(ValueError, match="drop master_weights"):
        make_optimizer(Net(), 1e-3, kind="adamw8bit", master_weights=True)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer(Net(), 1e-3, kind="sgd")


def test_settings_that_cannot_run_with_adamw8bit_stop_with_one_line(monkeypatch):
    check_optimizer_choice(TrainingOptions(optimizer="adamw8bit"), world_size=2)  # DDP is fine
    cases = [
        (TrainingOptions(optimizer="adamw8bit", master_weights=True), 1, False, "drop --master-weights"),
        (TrainingOptions(optimizer="adamw8bit", lora_r=8), 1, False, "LoRA"),
        (TrainingOptions(optimizer="adamw8bit"), 2, True, "FSDP2"),
    ]
    for opts, world, fsdp, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_optimizer_choice(opts, world_size=world, fsdp=fsdp)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP2"):
        check_optimizer_choice(TrainingOptions(optimizer="adamw8bit"), world_size=2)


def test_a_missing_torchao_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # makes the import fail
    monkeypatch.setattr(lowbit_codes, "_QUANT_UTILS", None)  # as in a process that never imported it
    with pytest.raises(ConfigError, match=r"pip install 'rlhf-kit\[lowbit\]'"):
        check_optimizer_choice(TrainingOptions(optimizer="adamw8bit"), world_size=1)
    check_optimizer_choice(TrainingOptions(), world_size=1)  # adamw needs no torchao


def test_auto_never_adds_master_weights_to_adamw8bit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # where auto would pick master weights
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    sup = SupervisedOptions(optimizer="adamw8bit")
    assert settle_speed_defaults(sup, embedded=False, world_size=1) is None
    assert sup.master_weights is False and sup.mixed_precision == "no"  # bf16 weights: no autocast casts
    ppo = TrainingOptions(optimizer="adamw8bit")
    assert settle_ppo_master_weights(ppo, "auto", world_size=1, fsdp=False) is None
    assert ppo.master_weights is False


def test_installing_torchao_adds_no_import_noise():
    """transformers imports torchao at start-up once it is installed; on a torch build that cannot load
    torchao's prebuilt kernels (CPU, here) that used to print a warning per kernel file and a torch
    deprecation note on every run. rlhf_kit filters exactly those lines."""
    import subprocess

    code = "import rlhf_kit, torchao, logging; logging.getLogger('torchao').warning('kept: other warnings')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to load" not in proc.stderr and "is an Enum subclass" not in proc.stderr, proc.stderr
    assert "kept: other warnings" in proc.stderr
