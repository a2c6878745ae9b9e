"""The PPO recipe's embedded default: tiny models and the shipped HH prompts, made offline."""

from __future__ import annotations

import dataclasses
import os


def fill_defaults(cfg, is_main: bool):
    """Return ``cfg`` with missing models and prompt files replaced by embedded defaults.

    Missing actor -> a tiny random Llama (and its BPE tokenizer) under ``<output_dir>/init/actor``;
    missing reward model (and no reward function or critic server) -> a tiny random RM sharing that
    tokenizer (:func:`default_reward_model`); missing training prompts -> the shipped HH sample split
    into ``train_prompts.jsonl`` / ``test_prompts.jsonl`` under ``<output_dir>/data`` (nothing else; the
    test prompts validate unless --val-prompts is given). Given training prompts without --val-prompts write nothing here: validation prompts are
    held out of them (``rlhf_kit.ppo.load_prompt_sets``).
    Only the main process writes; others wait at the caller's barrier. Each model directory is written
    under a temporary name and renamed into place, so a kill never leaves a half-written one.
    """
    from rlhf_kit.tiny import save_tiny_pretrained, train_tokenizer
    from rlhf_kit.training.atomic import atomic_directory

    init = os.path.join(cfg.output_dir, "init")
    updates = {}
    tokenizer = None
    if cfg.actor is None:
        updates["actor"] = os.path.join(init, "actor")
        if is_main and not os.path.exists(os.path.join(updates["actor"], "config.json")):
            tokenizer = train_tokenizer()
            with atomic_directory(updates["actor"], "the embedded default actor") as tmp:
                save_tiny_pretrained(str(tmp), "causal_lm", tokenizer=tokenizer, seed=cfg.seed)
            print(f"embedded default: tiny random actor written to {updates['actor']}")
    remote = getattr(cfg, "critic_server", None) is not None  # the server holds critic and RM
    if cfg.reward_model is None and cfg.reward_fn is None and not remote:
        if cfg.actor is not None:
            raise ValueError("--actor was given without --reward-model or --reward-fn")
        updates["reward_model"] = default_reward_model(cfg.output_dir, cfg.seed, is_main, tokenizer)
    critic_free = getattr(cfg, "advantage_estimator", "gae") != "gae"  # nothing to initialise
    if (
        cfg.reward_fn is not None
        and cfg.critic is None
        and cfg.reward_model is None
        and not remote
        and not critic_free
    ):
        updates["critic"] = os.path.join(init, "critic")
        if is_main and not os.path.exists(os.path.join(updates["critic"], "config.json")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(updates.get("actor", cfg.actor))
            with atomic_directory(updates["critic"], "the embedded default critic") as tmp:
                save_tiny_pretrained(str(tmp), "reward", tokenizer=tok, seed=cfg.seed + 2)
    if cfg.train_prompts is None:  # given training prompts without --val-prompts: held out of them instead
        from rlhf_kit.data.hh import prepare_default_hh

        data_dir = os.path.join(cfg.output_dir, "data")
        paths = {
            "train_prompts": os.path.join(data_dir, "train_prompts.jsonl"),
            "test_prompts": os.path.join(data_dir, "test_prompts.jsonl"),
        }
        if is_main and not os.path.exists(paths["test_prompts"]):
            paths = prepare_default_hh(data_dir, prompts_only=True)  # PPO reads prompts only
        updates["train_prompts"] = paths["train_prompts"]
        if cfg.val_prompts is None:
            updates["val_prompts"] = paths["test_prompts"]
    return dataclasses.replace(cfg, **updates)


def default_reward_model(output_dir: str, seed: int, is_main: bool = True, tokenizer=None) -> str:
    """``<output_dir>/init/reward_model``: the embedded tiny random RM (weights from ``seed + 1``, the
    embedded BPE tokenizer unless ``tokenizer`` is given), written by the main process if missing.
    The PPO recipe and recipes/critic_server.py share it, so their embedded defaults pair up."""
    from rlhf_kit.tiny import save_tiny_pretrained, train_tokenizer
    from rlhf_kit.training.atomic import atomic_directory

    path = os.path.join(output_dir, "init", "reward_model")
    if is_main and not os.path.exists(os.path.join(path, "config.json")):
        with atomic_directory(path, "the embedded default reward model") as tmp:
            save_tiny_pretrained(str(tmp), "reward", tokenizer=tokenizer or train_tokenizer(), seed=seed + 1)
    return path
