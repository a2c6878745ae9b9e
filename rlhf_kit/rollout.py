"""A rollout as one dataclass of tensors, and a buffer that mini-batches them.

Every field is a tensor whose first dimension is the batch, so moving, slicing, padding and
concatenating are one map over the fields (:func:`dataclasses.fields`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from rlhf_kit.models.layout import real_runs
from rlhf_kit.models.transfer import host_tensor


@dataclass
class Rollout:
    """One batch of experience. ``b`` samples, prompts of width ``p``, responses of width ``n``.

    Attributes:
        sequences: ``(b, p + n)`` left-padded prompts followed by right-padded responses.
        attention_mask: ``(b, p + n)``.
        response_mask: ``(b, n)`` 1 on response tokens, EOS included.
        logprobs: ``(b, n)`` actor log-probs at sampling time (old policy).
        ref_logprobs: ``(b, n)`` reference-model log-probs.
        values: ``(b, n)`` critic values.
        rewards: ``(b, n)`` shaped per-token rewards.
        advantages: ``(b, n)``.
        returns: ``(b, n)``.
        scores: ``(b,)`` sequence scores from the reward model (or function).
        finished: ``(b,)`` bool, True where the response ended with EOS or a stop string.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    finished: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Rollout:
        """A new rollout with ``fn`` applied to every field."""
        return Rollout(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Rollout:
        return self.map(lambda x: x.to(device, non_blocking=non_blocking))

    def __getitem__(self, index) -> Rollout:
        return self.map(lambda x: x[index])

    def __len__(self) -> int:
        return self.batch_size


# Fields that are per prompt token / per response token; padding side and value per group.
_PROMPT_SIDE = ("sequences", "attention_mask")


def _pad_to(x: torch.Tensor, width: int, left: bool, value: float) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_full((x.shape[0], extra), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int = 0) -> Rollout:
    """Concatenate rollouts whose prompt and response widths differ.

    Prompts are left-padded to the widest prompt, responses right-padded to the widest response
    (``pad_token_id`` in ``sequences``, 0 elsewhere), so ``sequences`` stay "prompt block then
    response block".
    """
    if not rollouts:
        raise ValueError("no rollouts to concatenate")
    p = max(r.prompt_length for r in rollouts)
    n = max(r.response_mask.shape[1] for r in rollouts)
    parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in dataclasses.fields(Rollout)}
    for r in rollouts:
        rp = r.prompt_length
        for f in dataclasses.fields(Rollout):
            x = getattr(r, f.name)
            if f.name in _PROMPT_SIDE:
                value = pad_token_id if f.name == "sequences" else 0
                prompt = _pad_to(x[:, :rp], p, left=True, value=value)
                resp = _pad_to(x[:, rp:], n, left=False, value=value)
                x = torch.cat([prompt, resp], dim=1)
            elif x.dim() == 2:
                x = _pad_to(x, n, left=False, value=0)
            parts[f.name].append(x)
    return Rollout(**{k: torch.cat(v, dim=0) for k, v in parts.items()})


class RolloutBuffer:
    """Collects rollouts (of different widths) and yields shuffled mini-batches.

    >>> buf = RolloutBuffer(pad_token_id=tok.pad_token_id, seed=0)
    >>> buf.append(rollout_a); buf.append(rollout_b)
    >>> for mb in buf.minibatches(batch_size=16, epochs=1, device="cuda"): ...
    """

    def __init__(self, pad_token_id: int = 0, seed: int = 0):
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self._items: list[Rollout] = []
        self._cat: Rollout | None = None

    def append(self, rollout: Rollout) -> None:
        self._items.append(rollout)
        self._cat = None

    def clear(self) -> None:
        self._items.clear()
        self._cat = None

    def __len__(self) -> int:
        return sum(r.batch_size for r in self._items)

    def data(self) -> Rollout:
        """All stored samples as one padded :class:`Rollout`."""
        if self._cat is None:
            self._cat = concat_rollouts(self._items, self.pad_token_id)
        return self._cat

    def set_data(self, rollout: Rollout) -> None:
        """Replace the contents (e.g. after advantages were filled in on the concatenated data)."""
        self._items = [rollout]
        self._cat = rollout

    def minibatches(
        self,
        batch_size: int,
        epochs: int = 1,
        shuffle: bool = True,
        device: torch.device | str | None = None,
        drop_last: bool = False,
        group_size: int = 1,
        trim: bool = True,
    ) -> Iterator[Rollout]:
        """Mini-batches of ``batch_size`` samples, ``epochs`` passes, order from the seeded generator.

        With ``group_size`` K > 1 the data is ``len / K`` consecutive groups (K samples of one prompt)
        and the shuffle moves whole groups, so a group is never split across mini-batches
        (``batch_size`` must be a multiple of K). Each mini-batch is trimmed to its own widest
        response (right padding) to save compute, unless ``trim`` is False (a caller that cuts its
        micro-batches to their own columns anyway saves the trim's read of the device).
        """
        data = self.data()
        total = data.batch_size
        if group_size < 1 or total % group_size or batch_size % group_size:
            raise ValueError(
                f"RolloutBuffer: {total} samples and mini-batches of {batch_size} must both be multiples "
                f"of the group size {group_size}"
            )
        n_groups = total // group_size
        offsets = torch.arange(group_size)
        for _ in range(epochs):
            groups = torch.randperm(n_groups, generator=self.generator) if shuffle else torch.arange(n_groups)
            order = (groups[:, None] * group_size + offsets).reshape(-1)
            for s in range(0, total, batch_size):
                idx = order[s : s + batch_size]
                if drop_last and len(idx) < batch_size:
                    break
                # the index on the data's device first: a CPU index would be copied (and waited for) per field
                mb = data[host_tensor(idx, data.sequences.device, torch.long)]
                mb = trim_responses(mb) if trim else mb
                yield mb.to(device) if device is not None else mb


def trim_responses(r: Rollout) -> Rollout:
    """Drop trailing response columns that no sample of ``r`` uses."""
    n = r.response_mask.shape[1]
    columns = torch.arange(1, n + 1, device=r.response_mask.device)
    n_keep = max(int((r.response_mask.ne(0).any(0) * columns).amax()), 1) if n else 1  # one read
    if n_keep == n:
        return r
    cut = n - n_keep
    return r.map(lambda x: x[:, : x.shape[1] - cut] if x.dim() == 2 else x)


def sample_extents(r: Rollout) -> tuple[list[int], list[int], list[int], list[int]]:
    """Per sample, the first prompt column it uses (after its left padding), how many response columns
    it uses (up to its last response token), 1 where its real tokens (``attention_mask``) form one
    contiguous run, else 0, and its real-token count (``attention_mask``); one device-to-host read for
    the four lists."""
    p, n = r.prompt_length, r.response_mask.shape[1]
    used = r.attention_mask[:, :p] != 0
    first = torch.where(used.any(-1), used.int().argmax(-1), p)
    columns = torch.arange(1, n + 1, device=r.response_mask.device)
    last = (r.response_mask.ne(0) * columns).amax(-1) if n else torch.zeros_like(first)
    contiguous = real_runs(r.attention_mask)[1].long()
    real = r.attention_mask.ne(0).sum(-1)
    firsts, lasts, runs, lengths = torch.stack([first, last, contiguous, real]).tolist()
    return firsts, lasts, runs, lengths


def length_grouped_micro_batches(
    r: Rollout, groups: list[list[int]], extents: tuple[list[int], ...] | None = None
) -> list[Rollout]:
    """The micro-batches ``r[group]`` for each list of sample indices, each cut to the prompt and
    response columns its samples use, so similar lengths grouped together cost fewer padded tokens.
    Only padding goes: every sample's tokens, masks and positions stay. The column counts come from one
    read of :func:`sample_extents` (no device sync per micro-batch), or from ``extents`` if given."""
    firsts, lasts = (extents or sample_extents(r))[:2]
    p = r.prompt_length
    out = []
    for idx in groups:
        first = min(firsts[i] for i in idx)
        keep = max(1, max(lasts[i] for i in idx))  # as trim_responses: at least one response column
        sub = r[host_tensor(idx, r.sequences.device, torch.long)]  # no device sync per micro-batch
        fields = {}
        for f in dataclasses.fields(sub):
            x = getattr(sub, f.name)
            if f.name in _PROMPT_SIDE:
                x = x[:, first : p + keep]
            elif x.dim() == 2:
                x = x[:, :keep]
            fields[f.name] = x
        out.append(Rollout(**fields))
    return out


def pack_by_token_budget(
    prompts: list[int], responses: list[int], budget: int, parts: int | None = None
) -> list[list[int]]:
    """Sample indices cut into groups whose padded size, ``len(group) x (longest prompt + longest
    response in the group)``, stays within ``budget`` tokens (a sample over the budget alone).

    ``prompts[i]`` / ``responses[i]`` are sample ``i``'s token counts. Samples are taken longest first
    (prompt plus response) and a group grows while it fits. With ``parts`` (at least the greedy count,
    at most the number of samples) the costliest group is halved until there are ``parts`` groups, so
    every rank can run as many forward passes as the rank that needs most. A pure function.
    """
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = sorted(range(len(prompts)), key=lambda i: (-(prompts[i] + responses[i]), i))

    def cost(group: list[int]) -> int:
        return len(group) * (max(prompts[i] for i in group) + max(responses[i] for i in group))

    groups: list[list[int]] = []
    for i in order:
        if groups and cost(groups[-1] + [i]) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    if parts is not None:
        if not len(groups) <= parts <= len(order):
            raise ValueError(
                f"cannot cut {len(order)} samples into {parts} micro-batches (at least {len(groups)})"
            )
        while len(groups) < parts:
            j = max((k for k in range(len(groups)) if len(groups[k]) > 1), key=lambda k: cost(groups[k]))
            half = len(groups[j]) // 2
            groups[j : j + 1] = [groups[j][:half], groups[j][half:]]
    return groups
