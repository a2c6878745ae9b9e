"""Serve the PPO critic and reward model from their own job, as NeMo-Aligner's critic server does.

    python recipes/critic_server.py                     # embedded default: the PPO recipe's tiny RM
    python recipes/ppo.py --critic-server http://127.0.0.1:5567              # in another shell
    python recipes/critic_server.py --critic rm/final --reward-model rm/final --host 0.0.0.0 \
        --total-steps 80 --lr 9e-6 --min-lr 9e-7 --output-dir out/critic_server

The actor job (recipes/ppo.py --critic-server URL) sends /infer (critic values and RM scores of each
rollout micro-batch) and /train (one critic update on the rollout) requests; /save and /load keep the
critic's checkpoints in step with the actor's, under --output-dir. An actor job of N ranks sends N
shares of each global batch; the server updates once per global batch. Serves until killed or until a
/shutdown request (rlhf_kit.serving). Every request needs ``Authorization: Bearer <token>`` when a token
is set (--auth-token or RLHF_KIT_SERVER_TOKEN, which recipes/ppo.py sends), and a token is required to
listen beyond loopback. Plain HTTP, no TLS: see docs/server.md for what is and is not protected.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro


@dataclass
class CriticServerConfig:
    """Critic server. Every field is a command-line flag (``--field-name``)."""

    critic: str | None = None
    """Critic initialisation (a sequence-classification checkpoint, e.g. the reward model). None: the
    reward model."""
    reward_model: str | None = None
    """Reward model dir (output of recipes/reward_model.py) scored in /infer. None with --critic: no reward
    model (the actor job scores with --reward-fn). None with neither: the PPO recipe's embedded tiny
    reward model, made under <output-dir>/init."""
    total_steps: int = 8
    """Optimizer steps the critic's LR schedule spans: the PPO run's max_steps x ppo_epochs x
    num_rollout_samples / global_batch_size (recipes/ppo.py checks it; 8 matches its defaults)."""
    lr: float = 1e-5
    """Peak critic learning rate (AdamW, betas 0.9/0.98 as in recipes/ppo.py; NeMo-Aligner 9e-6)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay (NeMo-Aligner 9e-7)."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps (NeMo-Aligner 10)."""
    weight_decay: float = 0.1
    """AdamW weight decay (NeMo-Aligner 0.1; none on biases and norms)."""
    value_clip: float = 0.2
    """Critic loss clip (0: plain squared error); must equal the PPO run's --value-clip (it checks)."""
    micro_batch_size: int = 8
    """Most samples per forward in /infer and /train on this job's device (larger requests are split)."""
    gradient_checkpointing: bool = False
    """Recompute the critic's activations in the backward pass to save memory."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto: bf16 when the GPU supports it, else fp32; no: fp32; bf16: bf16 autocast."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0: every interface, which needs an auth token)."""
    auth_token: str | None = None
    """Shared secret clients send as 'Authorization: Bearer <token>'. None: $RLHF_KIT_SERVER_TOKEN (prefer
    the variable: a flag is visible to other users in the process list). Required off loopback."""
    allow_unauthenticated: bool = False
    """Listen beyond loopback without a token (anyone who reaches the port can train, save and stop)."""
    read_timeout: float = 60.0
    """Seconds a client has to send a request's head, and then its body (408 and closed after)."""
    idle_timeout: float = 30.0
    """Seconds an idle keep-alive connection stays open."""
    max_body_mb: int = 1024
    """Largest request body in MiB (413 past it)."""
    max_connections: int = 64
    """Most open connections (503 past it; keep it above the actor job's ranks, each holds one while
    waiting in /train); model work runs one request at a time regardless."""
    gather_timeout: float = 600.0
    """Seconds /train waits for the other ranks of a multi-rank actor job's global batch (504 after)."""
    port: int = 5567
    """TCP port; 0 picks a free one (the URL is printed either way)."""
    output_dir: str = "outputs/critic_server"
    """Relative /save and /load paths land here (recipes/ppo.py saves checkpoints/step_N and final)."""
    seed: int = 0
    """Seeds torch/numpy/python, and the embedded default's tiny reward model (as recipes/ppo.py does)."""
    verbose: bool = False
    """Log every request on stderr."""


def validate(cfg: CriticServerConfig) -> None:
    """Check the configuration before loading anything."""
    from rlhf_kit.serving.client import TOKEN_ENV
    from rlhf_kit.serving.server import is_loopback
    from rlhf_kit.training.run import check_positive
    from rlhf_kit.training.validate import check_model_path

    for name in ("critic", "reward_model"):
        if getattr(cfg, name) is not None:
            check_model_path(getattr(cfg, name))
    check_positive(total_steps=cfg.total_steps, lr=cfg.lr, micro_batch_size=cfg.micro_batch_size)
    if not 0 <= cfg.warmup_steps <= cfg.total_steps:
        raise ValueError(f"--warmup-steps {cfg.warmup_steps} must be in [0, --total-steps {cfg.total_steps}]")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr {cfg.min_lr} is larger than --lr {cfg.lr}")
    if not 0 <= cfg.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {cfg.port}")
    check_positive(read_timeout=cfg.read_timeout, idle_timeout=cfg.idle_timeout, max_body_mb=cfg.max_body_mb,
                   max_connections=cfg.max_connections, gather_timeout=cfg.gather_timeout)  # fmt: skip
    if auth_token(cfg) is None and not is_loopback(cfg.host) and not cfg.allow_unauthenticated:
        raise ValueError(
            f"--host {cfg.host} is not loopback: set --auth-token or {TOKEN_ENV} (or --allow-unauthenticated)"
        )


def auth_token(cfg: CriticServerConfig) -> str | None:
    from rlhf_kit.serving.client import TOKEN_ENV

    return cfg.auth_token if cfg.auth_token is not None else os.environ.get(TOKEN_ENV) or None


def main(cfg: CriticServerConfig) -> None:
    from transformers import AutoTokenizer

    from rlhf_kit.losses import ValueLoss
    from rlhf_kit.models import load_reward_stats
    from rlhf_kit.models.loading import quiet_weight_progress_bars
    from rlhf_kit.ppo import load_critic_and_reward_model
    from rlhf_kit.serving import CriticRewardService, CriticServer
    from rlhf_kit.training.dist import seed_everything
    from rlhf_kit.training.hf import resolve_mixed_precision
    from rlhf_kit.training.optim import build_optimizer, cosine_schedule
    from rlhf_kit.training.run import one_line_errors

    validate(cfg)
    quiet_weight_progress_bars()  # transformers' per-file loading bars (RLHF_KIT_HF_PROGRESS=1 keeps them)
    seed_everything(cfg.seed)
    if cfg.critic is None and cfg.reward_model is None:  # embedded default, shared with recipes/ppo.py
        from recipes._ppo_defaults import default_reward_model

        cfg = replace(cfg, reward_model=default_reward_model(cfg.output_dir, cfg.seed))
    critic_path = cfg.critic or cfg.reward_model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    critic, reward_model = load_critic_and_reward_model(
        critic_path, cfg.reward_model, gradient_checkpointing=cfg.gradient_checkpointing, device=device
    )
    # on the device first, as in recipes/ppo.py: the fused AdamW kernel on GPU
    critic.to(device)
    optimizer = build_optimizer(critic, cfg.lr, cfg.weight_decay, betas=(0.9, 0.98))
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, cfg.total_steps, cfg.min_lr)
    precision = resolve_mixed_precision(cfg.mixed_precision) or os.environ.get("ACCELERATE_MIXED_PRECISION")
    try:
        tokenizer = AutoTokenizer.from_pretrained(critic_path)  # saved with the critic's HF directory
    except (OSError, ValueError):
        tokenizer = None
    service = CriticRewardService(
        critic,
        optimizer,
        scheduler,
        ValueLoss(cfg.value_clip),
        reward_model,
        device=device,
        infer_micro_batch_size=cfg.micro_batch_size,
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        tokenizer=tokenizer,
        output_dir=cfg.output_dir,
        info={
            "total_steps": cfg.total_steps,
            "reward_stats": load_reward_stats(cfg.reward_model) if cfg.reward_model else None,
            "critic_path": critic_path,
            "reward_model_path": cfg.reward_model,
        },
    )
    os.makedirs(cfg.output_dir, exist_ok=True)
    with one_line_errors("critic_server.py"):
        try:
            server = CriticServer(
                service, cfg.host, cfg.port, verbose=cfg.verbose, auth_token=auth_token(cfg),
                allow_unauthenticated=cfg.allow_unauthenticated, read_timeout=cfg.read_timeout,
                idle_timeout=cfg.idle_timeout, max_body_bytes=cfg.max_body_mb << 20,
                max_connections=cfg.max_connections, gather_timeout=cfg.gather_timeout,
            )  # fmt: skip
        except OSError as e:
            raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    auth = "token required" if auth_token(cfg) else "no authentication (loopback only)"
    print(f"critic server listening on {server.url} ({auth})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print("critic server stopped", flush=True)


if __name__ == "__main__":
    from rlhf_kit.training.run import one_line_errors

    config = tyro.cli(CriticServerConfig)
    with one_line_errors("critic_server.py"):  # configuration errors: one line, before any model is loaded
        validate(config)
    main(config)
