"""A causal LM loaded as a reward model: one line about the new score head, not transformers' report."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from rlhf_kit.models.loading import only_new_score_head
from rlhf_kit.models.reward import load_reward_model
from tests.conftest import make_causal_lm, make_reward_model


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("lm")
    make_causal_lm(tokenizer, "llama", hidden_size=32, intermediate_size=64).save_pretrained(path)
    return path


def reports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]


def test_expected_new_head_is_one_line_and_bars_come_back(lm_dir, capfd, caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    hf_logging.enable_progress_bar()  # whatever an earlier test left (the recipes switch them off)
    model = load_reward_model(str(lm_dir))
    out, err = capfd.readouterr()
    assert model.score.weight.shape[0] == 1
    assert reports(caplog) == [] and "Loading weights" not in err
    lines = [line for line in out.splitlines() if "score head" in line]
    assert lines == [
        f"{lm_dir}: causal LM loaded as a reward model; its score head (score.weight) is new and randomly "
        "initialised, as expected (the lm_head is not used)"
    ]
    assert hf_logging.is_progress_bar_enabled()  # restored for every other load


def test_other_ranks_stay_quiet(lm_dir, capfd, caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    load_reward_model(str(lm_dir))
    out, _ = capfd.readouterr()
    assert "score head" not in out and reports(caplog) == []


def test_a_real_loading_problem_still_shows_the_report(lm_dir, tmp_path, capfd, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in lm_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    dropped = next(k for k in weights if "layers.0.mlp" in k)
    del weights[dropped]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    load_reward_model(str(broken))
    out, _ = capfd.readouterr()
    (report,) = reports(caplog)
    assert dropped in report and "score.weight" in report
    assert "score head" not in out


def test_a_reward_checkpoint_loads_silently(tokenizer, tmp_path, capfd, caplog):
    make_reward_model(tokenizer, "llama", hidden_size=32, intermediate_size=64).save_pretrained(tmp_path)
    load_reward_model(str(tmp_path))
    out, _ = capfd.readouterr()
    assert "score head" not in out and reports(caplog) == []


def test_only_new_score_head():
    head = {"missing_keys": ["score.weight"], "unexpected_keys": ["lm_head.weight"], "mismatched_keys": []}
    assert only_new_score_head(head)
    assert only_new_score_head({"missing_keys": ["score.weight", "score.bias"], "unexpected_keys": []})
    assert not only_new_score_head({**head, "missing_keys": ["score.weight", "model.norm.weight"]})
    assert not only_new_score_head({**head, "unexpected_keys": ["lm_head.weight", "extra.bias"]})
    assert not only_new_score_head({**head, "mismatched_keys": [("score.weight", (1, 2), (1, 3))]})
    assert not only_new_score_head({"missing_keys": [], "unexpected_keys": []})


def test_weight_progress_bars_are_quiet_unless_asked(monkeypatch):
    from transformers.utils import logging as hf_logging

    from rlhf_kit.models.loading import quiet_weight_progress_bars

    hf_logging.enable_progress_bar()
    try:
        monkeypatch.setenv("RLHF_KIT_HF_PROGRESS", "1")
        assert not quiet_weight_progress_bars() and hf_logging.is_progress_bar_enabled()
        monkeypatch.delenv("RLHF_KIT_HF_PROGRESS")
        assert quiet_weight_progress_bars() and not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
