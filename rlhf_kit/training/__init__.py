"""Training plumbing shared by the SFT, reward-model and PPO recipes.

- :mod:`~rlhf_kit.training.optim`: AdamW without decay on biases/norms, warm-up + cosine schedule,
  gradient clipping (plain and FSDP2).
- :mod:`~rlhf_kit.training.batching`: global = micro x accumulation x world size.
- :mod:`~rlhf_kit.training.checkpoint`: atomic checkpoints with exact resume.
- :mod:`~rlhf_kit.training.metrics`: metrics.jsonl and accelerate's trackers, phase timers, progress bar.
- :mod:`~rlhf_kit.training.offload`: idle models and optimizer state to pinned CPU memory and back.
- :mod:`~rlhf_kit.training.dist`: rank/world helpers that work without a process group.
- :mod:`~rlhf_kit.training.validate`: start-up checks of paths and model names.
- :mod:`~rlhf_kit.training.fsdp`: FSDP2 wrapping of HF decoders and full state dicts.
"""

from rlhf_kit.training.batching import BatchPlan, resolve_batch_sizes
from rlhf_kit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf_kit.training.dist import barrier, is_main_process, rank, seed_everything, world_size
from rlhf_kit.training.fsdp import apply_fsdp2, full_state_dict
from rlhf_kit.training.metrics import MetricsLogger, StepTimer, progress, read_metrics
from rlhf_kit.training.offload import (
    offload_model,
    offload_optimizer_state,
    offloaded,
    onload_model,
    onload_optimizer_state,
)
from rlhf_kit.training.optim import build_optimizer, clip_grad_norm, cosine_schedule
from rlhf_kit.training.options import SupervisedOptions, TrainingOptions
from rlhf_kit.training.precision import make_optimizer
from rlhf_kit.training.validate import check_model_path, check_path_exists

__all__ = [
    "BatchPlan",
    "SupervisedOptions",
    "TrainingOptions",
    "MetricsLogger",
    "StepTimer",
    "apply_fsdp2",
    "barrier",
    "build_optimizer",
    "make_optimizer",
    "check_model_path",
    "check_path_exists",
    "clip_grad_norm",
    "cosine_schedule",
    "full_state_dict",
    "is_main_process",
    "latest_checkpoint",
    "load_checkpoint",
    "offload_model",
    "offload_optimizer_state",
    "offloaded",
    "onload_model",
    "onload_optimizer_state",
    "progress",
    "rank",
    "read_metrics",
    "resolve_batch_sizes",
    "save_checkpoint",
    "seed_everything",
    "world_size",
]
