"""The critic (trained) and the reward model (frozen, optional) behind one object, in-process.

:class:`CriticRewardService` is what the HTTP server (:mod:`rlhf_kit.serving.server`) calls; used
directly it is also a drop-in ``remote`` for :func:`rlhf_kit.ppo.make_experience` in one process.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rlhf_kit.losses import ValueLoss
from rlhf_kit.models.reward import reward_scores
from rlhf_kit.models.value import response_values
from rlhf_kit.rollout import Rollout, RolloutBuffer, concat_rollouts
from rlhf_kit.serving.store import MARKER, CheckpointStore
from rlhf_kit.serving.wire import check_batch, check_positive


@dataclass
class TrainShare:
    """One actor rank's part of a global batch for :meth:`CriticRewardService.train_shares`.

    ``sequences``, ``attention_mask``: ``(b, p + n)``; ``response_mask``, ``values`` (old values),
    ``returns``: ``(b, n)``; ``prompt_length``: ``p``; ``seed``: the rank's ``RolloutBuffer`` seed.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    values: torch.Tensor
    returns: torch.Tensor
    prompt_length: int
    seed: int = 0

    def check(self, vocab_size: int | None = None) -> None:
        check_batch(self.sequences, self.attention_mask, self.prompt_length, self.response_mask,
                    vocab_size, values=self.values, returns=self.returns)  # fmt: skip

    def rollout(self) -> Rollout:
        """A :class:`Rollout` whose actor-side fields are zero: only the critic trains on it."""
        b = self.sequences.shape[0]
        zeros = torch.zeros(self.response_mask.shape)
        return Rollout(
            sequences=self.sequences.long(),
            attention_mask=self.attention_mask.long(),
            response_mask=self.response_mask.long(),
            logprobs=zeros,
            ref_logprobs=zeros,
            values=self.values.float(),
            rewards=zeros,
            advantages=zeros,
            returns=self.returns.float(),
            scores=torch.zeros(b),
            finished=torch.ones(b, dtype=torch.bool),
        )


class _GlobalBatches:
    """The mini-batches a local run of ``len(shares)`` data-parallel ranks trains on, each one global
    batch: rank ``r``'s mini-batch ``i`` (its own ``RolloutBuffer`` seed and order), concatenated in rank
    order. :func:`rlhf_kit.ppo.ppo_update` on these (no process group) weights each token by the global
    mini-batch's token count, as the ranks' all-reduced counts and averaged gradients do."""

    def __init__(self, shares: list[TrainShare]):
        self.buffers = []
        for share in shares:
            buf = RolloutBuffer(seed=share.seed)
            buf.set_data(share.rollout())
            self.buffers.append(buf)

    def minibatches(self, batch_size: int, epochs: int = 1, device=None, **kwargs):
        streams = [b.minibatches(batch_size, epochs=epochs, **kwargs) for b in self.buffers]
        for parts in zip(*streams):
            mb = parts[0] if len(parts) == 1 else concat_rollouts(list(parts))
            yield mb.to(device) if device is not None else mb


class _CriticAPI:
    """What the service and its client share: :meth:`train_rollout` on top of ``train``."""

    _pool: ThreadPoolExecutor | None = None

    def train(self, *args, **kwargs) -> dict[str, float]:  # pragma: no cover - overridden
        raise NotImplementedError

    def train_rollout(
        self, rollout: Rollout, cfg, seed: int, *, rank: int = 0, world_size: int = 1
    ) -> dict[str, float]:
        """:meth:`train` on a :class:`Rollout` with an :class:`rlhf_kit.ppo.UpdateConfig`'s batch sizes,
        epochs and clipping; ``seed`` is the actor rank's ``RolloutBuffer`` seed (same mini-batch order).
        With ``world_size > 1`` this is rank ``rank``'s share of one global batch (see the server)."""
        return self.train(
            rollout.sequences,
            rollout.attention_mask,
            rollout.response_mask,
            rollout.values,
            rollout.returns,
            rollout.prompt_length,
            mini_batch_size=cfg.mini_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            ppo_epochs=cfg.ppo_epochs,
            max_grad_norm=cfg.max_grad_norm,
            seed=seed,
            micro_batch_tokens=cfg.micro_batch_tokens,
            **({"rank": rank, "world_size": world_size} if world_size != 1 else {}),
        )

    def submit_train_rollout(self, rollout: Rollout, cfg, seed: int, **kwargs) -> Future:
        """:meth:`train_rollout` in a background thread, so the critic trains while the caller updates
        the actor; ``.result()`` gives the statistics (or raises the call's error). Calls run in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic-train")
        rollout = rollout.to("cpu")  # copied now: the caller may reuse its device memory
        return self._pool.submit(self.train_rollout, rollout, cfg, seed, **kwargs)


class CriticRewardService(_CriticAPI):
    """The critic (trained) and the reward model (frozen, optional) behind one object.

    Args:
        critic: a :class:`rlhf_kit.models.TokenValueModel` on ``device``.
        optimizer: the critic's optimizer; ``scheduler`` its LR schedule (stepped once per optimizer
            step, after each :meth:`train` call, as the PPO recipe steps its local schedule).
        value_loss: the clipped value loss (default ``ValueLoss(0.2)``).
        reward_model: scores in :meth:`infer`; None when the reward is computed elsewhere.
        device: where the models live; inputs are moved there, outputs come back on CPU.
        infer_micro_batch_size: most rows per forward in :meth:`infer`.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision; None runs in the weights' dtype.
        tokenizer: saved with the critic's HF directory (optional).
        output_dir: where :meth:`save` / :meth:`load` paths (``final``, ``checkpoints/<name>``) live
            (:class:`~rlhf_kit.serving.store.CheckpointStore`); None: no saving.
        info: extra entries for :meth:`describe` (e.g. ``total_steps``, ``reward_stats``).
    """

    def __init__(
        self,
        critic: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        value_loss: ValueLoss | None = None,
        reward_model: nn.Module | None = None,
        *,
        device: torch.device | str = "cpu",
        infer_micro_batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
        tokenizer: Any = None,
        output_dir: str | Path | None = None,
        info: dict[str, Any] | None = None,
        packed: bool | str = "auto",
    ):
        check_positive(infer_micro_batch_size=infer_micro_batch_size)
        self.packed = packed
        """Padding-free passes for values, scores and the critic's update (as the local run's
        ``--packed-passes``; ``"auto"``: on CUDA where exact, :func:`rlhf_kit.models.varlen.use_packed`)."""
        self.critic = critic
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.value_loss = value_loss if value_loss is not None else ValueLoss(0.2)
        self.reward_model = reward_model
        self.device = torch.device(device)
        self.infer_micro_batch_size = infer_micro_batch_size
        self.autocast_dtype = autocast_dtype
        self.tokenizer = tokenizer
        self.store = CheckpointStore(output_dir) if output_dir is not None else None
        self.info = dict(info or {})
        self.train_calls = 0
        """Completed :meth:`train` calls, one per global batch (restored by :meth:`load`)."""

    @property
    def vocab_size(self) -> int:
        """Token ids must lie in ``[0, vocab_size)``: the smaller of the critic's and the RM's."""
        sizes = [int(m.config.vocab_size) for m in (self.critic, self.reward_model) if m is not None]
        return min(sizes)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts a client checks before using the server (``/health`` returns them)."""
        rm = self.reward_model
        return {
            "reward_model": rm is not None,
            "critic_vocab_size": int(self.critic.config.vocab_size),
            "reward_model_vocab_size": int(rm.config.vocab_size) if rm is not None else None,
            "value_clip": float(self.value_loss.value_clip),
            "train_calls": self.train_calls,
            **self.info,
        }

    @torch.no_grad()
    def infer(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        response_mask: torch.Tensor,
        *,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Critic values and reward-model scores of one batch, in micro-batches, without gradients.

        Args:
            sequences, attention_mask: ``(b, p + n)`` left-padded prompts then right-padded responses.
            prompt_length: ``p``. response_mask: ``(b, n)`` (checked against the widths).
            with_scores: False skips the reward model.

        Returns:
            ``values (b, n)`` float32 (:func:`rlhf_kit.models.response_values`, not masked) and
            ``scores (b,)`` float32 (:func:`rlhf_kit.models.reward_scores`), or None without a reward
            model or with ``with_scores=False``. On CPU.
        """
        check_batch(sequences, attention_mask, prompt_length, response_mask, self.vocab_size)
        score = with_scores and self.reward_model is not None
        values, scores = [], []
        for s in range(0, sequences.shape[0], self.infer_micro_batch_size):
            seq = sequences[s : s + self.infer_micro_batch_size].to(self.device)
            am = attention_mask[s : s + self.infer_micro_batch_size].to(self.device)
            with self._autocast():
                values.append(
                    response_values(self.critic, seq, am, prompt_length, packed=self.packed).float().cpu()
                )
                if score:
                    scores.append(reward_scores(self.reward_model, seq, am, packed=self.packed).cpu())
        return torch.cat(values), torch.cat(scores) if score else None

    def train(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        values: torch.Tensor,
        returns: torch.Tensor,
        prompt_length: int,
        *,
        mini_batch_size: int,
        micro_batch_size: int,
        ppo_epochs: int = 1,
        max_grad_norm: float = 1.0,
        seed: int = 0,
        micro_batch_tokens: int = 0,
    ) -> dict[str, float]:
        """One critic update on a rollout: exactly the critic half of :func:`rlhf_kit.ppo.ppo_update`.

        Args:
            sequences, attention_mask: ``(b, p + n)``; response_mask, values (old values), returns:
                ``(b, n)``; prompt_length: ``p``.
            mini_batch_size: samples per optimizer step; micro_batch_size: samples per forward/backward;
                micro_batch_tokens: a padded-token budget per forward instead (0: fixed micro-batches).
            ppo_epochs: passes over the rollout; max_grad_norm: gradient clipping.
            seed: the seed of the actor job's ``RolloutBuffer`` (mini-batches come in the same order).

        Returns ``value/loss``, ``value/clip_fraction``, ``value/mean``, ``value/grad_norm`` (as
        ``ppo_update`` averages them) and ``lr/critic`` after the schedule's steps.
        """
        share = TrainShare(sequences, attention_mask, response_mask, values, returns, prompt_length, seed)
        return self.train_shares([share], mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size,
                                 ppo_epochs=ppo_epochs, max_grad_norm=max_grad_norm,
                                 micro_batch_tokens=micro_batch_tokens)  # fmt: skip

    def train_shares(
        self,
        shares: list[TrainShare],
        *,
        mini_batch_size: int,
        micro_batch_size: int,
        ppo_epochs: int = 1,
        max_grad_norm: float = 1.0,
        micro_batch_tokens: int = 0,
    ) -> dict[str, float]:
        """One critic update on a global batch sent by ``len(shares)`` actor ranks (rank order): the
        update a local data-parallel run of that many ranks makes (per-rank ``mini_batch_size`` and
        mini-batch order, token-weighted gradient over the global mini-batch, one optimizer step each).
        Statistics as :meth:`train`, averaged over every rank's micro-batches."""
        from rlhf_kit.ppo import ExperienceConfig, UpdateConfig, ppo_update

        if not shares:
            raise ValueError("no shares to train on")
        check_positive(mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size,
                       ppo_epochs=ppo_epochs)  # fmt: skip
        if (
            isinstance(micro_batch_tokens, bool)
            or not isinstance(micro_batch_tokens, int)
            or micro_batch_tokens < 0
        ):
            raise ValueError(f"micro_batch_tokens must be a non-negative integer, got {micro_batch_tokens!r}")
        for share in shares:
            share.check(self.vocab_size)
        steps = [math.ceil(s.sequences.shape[0] / mini_batch_size) for s in shares]
        if len(set(steps)) > 1:
            raise ValueError(f"ranks' shares give different mini-batch counts {steps} (rows per rank differ)")
        cfg = UpdateConfig(
            mini_batch_size=mini_batch_size,
            micro_batch_size=micro_batch_size,
            micro_batch_tokens=micro_batch_tokens,
            ppo_epochs=ppo_epochs,
            max_grad_norm=max_grad_norm,
            train_actor=False,
            train_critic=True,
            packed=self.packed,
        )
        batches = _GlobalBatches(shares) if len(shares) > 1 else _single_buffer(shares[0])
        self.critic.train()
        with self._autocast():
            stats = ppo_update(
                None, self.critic, None, self.optimizer, batches, None, self.value_loss, cfg,
                ExperienceConfig(), device=self.device,
            )  # fmt: skip
        if self.scheduler is not None:
            for _ in range(ppo_epochs * steps[0]):
                self.scheduler.step()
        self.train_calls += 1
        stats["lr/critic"] = float(self.optimizer.param_groups[0]["lr"])
        return stats

    def save(self, path: str | Path, keep_last: int | None = None) -> str:
        """Write ``path/critic`` (a standard HF sequence-classification directory, tokenizer included)
        and ``path/state`` (an exact-resume checkpoint: weights, optimizer, scheduler, RNG, train calls),
        atomically, at ``<output_dir>/final`` or ``<output_dir>/checkpoints/<name>``. With ``keep_last``
        (``checkpoints/`` only), older server-written checkpoints there beyond the newest ``keep_last``
        are deleted. Returns the directory written."""
        from rlhf_kit.training.checkpoint import save_checkpoint
        from rlhf_kit.training.hf import save_hf_model

        def write(tmp: Path) -> None:
            save_hf_model(getattr(self.critic, "model", self.critic), tmp / "critic", self.tokenizer)
            save_checkpoint(
                tmp / "state",
                self.train_calls,
                models={"critic": self.critic},
                optimizers={"critic": self.optimizer},
                schedulers={"critic": self.scheduler} if self.scheduler is not None else None,
                extra={"train_calls": self.train_calls},
            )
            (tmp / MARKER).write_text(json.dumps({"train_calls": self.train_calls, "time": time.time()}))

        return str(self._store().save(path, write, keep_last))

    def load(self, path: str | Path) -> int:
        """Restore what :meth:`save` wrote at ``path``; returns the restored train-call count."""
        from rlhf_kit.training.checkpoint import load_checkpoint

        directory = self._store().load_dir(path)
        _, extra = load_checkpoint(
            directory / "state",
            models={"critic": self.critic},
            optimizers={"critic": self.optimizer},
            schedulers={"critic": self.scheduler} if self.scheduler is not None else None,
        )
        self.train_calls = int(extra["train_calls"])
        return self.train_calls

    def _store(self) -> CheckpointStore:
        if self.store is None:
            raise ValueError("this critic server has no output directory to save to or load from")
        return self.store


def _single_buffer(share: TrainShare) -> RolloutBuffer:
    buf = RolloutBuffer(seed=share.seed)
    buf.set_data(share.rollout())
    return buf
