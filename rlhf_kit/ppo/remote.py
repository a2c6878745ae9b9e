"""What ``rlhf_kit.ppo`` needs of a critic (and reward model) held outside this process.

A critic server client (``rlhf_kit.serving.RemoteCritic``) or an in-process ``CriticRewardService``
satisfies these protocols; ``rlhf_kit.ppo`` never imports the server code (the layers go one way:
``serving`` builds on ``ppo``), and the caller constructs the client and passes it in.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from rlhf_kit.rollout import Rollout


@runtime_checkable
class CriticInference(Protocol):
    """A critic (and optionally a reward model) held outside this process, e.g. a critic server client.

    ``infer`` takes ``sequences, attention_mask (b, p + n)``, ``prompt_length`` ``p`` and
    ``response_mask (b, n)``; it returns ``values (b, n)`` (the critic's value of the state generating
    each response token, unmasked) and ``scores (b,)``, or None for the scores without a reward model
    or with ``with_scores=False``.
    """

    def infer(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        response_mask: torch.Tensor,
        *,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@runtime_checkable
class CriticTrainer(CriticInference, Protocol):
    """A remote critic that also trains, saves and loads itself (the critic half of a PPO step).

    ``train_rollout(rollout, update_cfg, seed)`` runs the critic half of
    :func:`~rlhf_kit.ppo.ppo_update` on ``rollout`` with ``update_cfg``'s batch sizes, epochs and
    clipping and the ``RolloutBuffer`` seed ``seed``, returning its statistics; ``save(path,
    keep_last)`` and ``load(path)`` write and restore its exact-resume state at ``path`` (on its side).
    """

    def train_rollout(self, rollout: Rollout, cfg, seed: int) -> dict[str, float]: ...

    def save(self, path: str, keep_last: int | None = None) -> str: ...

    def load(self, path: str) -> int: ...
