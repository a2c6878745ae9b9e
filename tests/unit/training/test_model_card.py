"""The model card of a recipe's final/ directory: hub front matter, body, atomic write."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from rlhf_kit.training import dist as D
from rlhf_kit.training.model_card import HH, command_line, render_model_card, write_model_card


def sft_config(tmp_path, **kw):
    data = tmp_path / "my_data.jsonl"
    data.write_text("{}\n")
    return {"model": "org/base-1b", "train_data": data, "val_data": None, "test_data": None,
            "output_dir": tmp_path / "sft", "lr": 2e-5, "max_steps": 100, **kw}  # fmt: skip


def test_front_matter_is_hub_yaml_with_hub_ids_only(tmp_path):
    text = render_model_card(
        "sft", sft_config(tmp_path), {"val/loss": 1.23456789}, command="python x.py --lr 2e-05"
    )
    card = ModelCard(text)
    assert text.startswith("---\n")
    assert card.data.base_model == "org/base-1b" and card.data.library_name == "transformers"
    assert card.data.tags == ["rlhf_kit", "sft"] and card.data.pipeline_tag == "text-generation"
    assert card.data.datasets is None  # a local file is named in the body, not in the front matter
    assert str(tmp_path / "my_data.jsonl") in card.text
    assert "| val/loss | `1.23457` |" in card.text and "| --lr | `2e-05` |" in card.text
    assert "```bash\npython x.py --lr 2e-05\n```" in card.text


def test_embedded_default_data_counts_as_hh_and_a_local_model_passes_on_its_base(tmp_path):
    sft_final = tmp_path / "sft" / "final"
    sft_final.mkdir(parents=True)
    (sft_final / "README.md").write_text(render_model_card("sft", sft_config(tmp_path), {}, "python a"))
    out = tmp_path / "rm"
    (out / "data").mkdir(parents=True)
    train = out / "data" / "train_comparisons.jsonl"
    train.write_text("{}\n")
    config = {"model": str(sft_final), "train_data": train, "output_dir": out, "margin": 0.0}
    card = ModelCard(render_model_card("reward_model", config, {"val/accuracy": 0.7}, "python b"))
    assert card.data.base_model == "org/base-1b"  # the SFT card's base, not the local path
    assert card.data.datasets == [HH] and card.data.tags == ["rlhf_kit", "reward-model", "reward-trainer"]
    assert card.data.pipeline_tag == "text-classification" and "Bradley-Terry" in card.text
    local = {"actor": str(tmp_path / "plain"), "train_prompts": "org/prompts", "output_dir": tmp_path / "ppo"}
    (tmp_path / "plain").mkdir()
    ppo = ModelCard(render_model_card("ppo", local, {}, "python c"))
    assert ppo.data.base_model is None and ppo.data.datasets == ["org/prompts"]  # a card-less local dir


def test_write_is_atomic_flattens_metrics_and_happens_on_the_main_process_only(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    metrics = {"val": {"loss": 0.5, "num_pairs": 12, "note": "x"}, "test": {"loss": 0.25}, "step": 3}
    path = write_model_card(final, "sft", sft_config(tmp_path), metrics, command="python x")
    assert path == final / "README.md" and sorted(p.name for p in final.iterdir()) == ["README.md"]
    text = path.read_text()
    for row in (
        "| val/loss | `0.5` |",
        "| val/num_pairs | `12` |",
        "| test/loss | `0.25` |",
        "| step | `3` |",
    ):
        assert row in text
    assert "note" not in text
    monkeypatch.setattr(D, "is_main_process", lambda: False)
    other = tmp_path / "other"
    other.mkdir()
    assert write_model_card(other, "sft", sft_config(tmp_path), metrics) is None and not list(other.iterdir())


def test_command_line_names_the_launcher_and_unknown_recipes_fail(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (
        command_line(["recipes/sft.py", "--train-data", "a b.jsonl"])
        == "python recipes/sft.py --train-data 'a b.jsonl'"
    )
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert command_line(["recipes/ppo.py"]) == "accelerate launch --num_processes 4 recipes/ppo.py"
    with pytest.raises(ValueError, match="unknown recipe 'dpo'"):
        render_model_card("dpo", {}, {})
