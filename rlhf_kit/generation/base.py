"""The generation contract shared by every backend: sampling parameters, the output, the protocol.

Conventions (what PPO relies on):

* prompts arrive **left padded**: ``input_ids (b, p)``, ``attention_mask (b, p)``;
* ``GenerationOutput.sequences (b, p + n)`` keeps the prompt block exactly as given, then ``n`` response
  columns, where ``n`` is the length of the longest response (at most ``max_new_tokens``); tokens after a
  response's end are ``pad_token_id``;
* a response ends at (and includes) the first EOS token, or the last token of the first matched stop
  string; ``response_mask`` is 1 up to and including that token;
* ``logprobs`` are the sampled tokens' log-probabilities under ``softmax(logits / temperature)`` of the
  *unfiltered* model distribution, the same quantity :func:`rlhf_kit.logprobs.sequence_logprobs`
  recomputes. Top-k, top-p and ``min_new_tokens`` decide which token is drawn, not what is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from rlhf_kit.models.transfer import host_tensor

#: What ``update_weights`` accepts: a model, a state dict, or an iterable of ``(hf_name, tensor)``.
Weights = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

#: Prefixes that wrappers put in front of HF parameter names (DDP, torch.compile, FSDP1, accelerate).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``top_k=0`` and ``top_p=1.0`` switch those filters off.

    ``eos_token_id`` / ``pad_token_id`` default (``None``) to the model config's. ``ignore_eos`` keeps
    generating through EOS (benchmarks). ``seed`` reseeds the global torch RNG before sampling.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_strings: tuple[str, ...] = ()
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"SamplingParams.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if self.temperature <= 0:
            raise ValueError(f"SamplingParams.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop_strings, str):
            raise ValueError("SamplingParams.stop_strings must be a tuple of strings, not one string")
        if any(not s for s in self.stop_strings):
            raise ValueError("SamplingParams.stop_strings must not contain empty strings")


@dataclass
class GenerationOutput:
    """Prompt + response batch as PPO consumes it (shapes in the module docstring).

    Attributes:
        sequences: ``(b, p + n)`` prompt ids (left padded, as given) then response ids.
        prompt_length: ``p``, the prompt block width; responses start at this column.
        response_mask: ``(b, n)`` long, 1 on response tokens up to and including the end token.
        logprobs: ``(b, n)`` float32 sampler log-probs (0 where masked).
        finished: ``(b,)`` bool, True when the response ended by EOS or a stop string.
        attention_mask: ``(b, p + n)`` long, the prompt mask then ``response_mask``.
    """

    sequences: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor
    attention_mask: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def responses(self) -> torch.Tensor:
        """``(b, n)`` response ids (pad after each response's end)."""
        return self.sequences[:, self.prompt_length :]


@runtime_checkable
class GenerationBackend(Protocol):
    """What PPO calls: generate, refresh weights from the trainer, and free KV memory while training."""

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> GenerationOutput: ...

    def update_weights(self, weights: Weights) -> int: ...

    def wake(self) -> None: ...

    def sleep(self) -> None: ...


# ----------------------------------------------------------------------------------------------------
# helpers shared by the backends


def eos_ids(params: SamplingParams, config: Any) -> list[int]:
    """EOS ids to stop on: ``params.eos_token_id`` or the config's; ``[]`` when ``ignore_eos``."""
    if params.ignore_eos:
        return []
    eos = params.eos_token_id if params.eos_token_id is not None else getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_id(params: SamplingParams, config: Any) -> int:
    """Pad id for response padding: ``params.pad_token_id``, the config's, the first EOS, or 0."""
    if params.pad_token_id is not None:
        return int(params.pad_token_id)
    pad = getattr(config, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else 0


def check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Shapes ``(b, p)`` equal, ``p >= 1``, and left padding (no 0 after a 1 in any row)."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (b, p); got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("prompts must have at least one column (p >= 1)")
    m = attention_mask.long()
    # left padded <=> the mask never decreases along a row; both checks in one read of the device
    gaps, empty = (m[:, 1:] < m[:, :-1]).any(1), m.sum(1) == 0
    gap_any, empty_any = torch.stack([gaps.any(), empty.any()]).tolist()
    if gap_any:
        bad = int(gaps.nonzero()[0, 0])
        raise ValueError(f"prompts must be left padded; row {bad} of attention_mask has a 0 after a 1")
    if empty_any:
        bad = int(empty.nonzero()[0, 0])
        raise ValueError(f"prompt row {bad} is empty (attention_mask all 0)")


def valid_until_eos(tokens: torch.Tensor, eos: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, n)`` bool mask of tokens up to and including the first EOS, and ``(b,)`` ended-by-EOS."""
    if not eos:
        return torch.ones_like(tokens, dtype=torch.bool), torch.zeros(
            tokens.shape[0], dtype=torch.bool, device=tokens.device
        )
    is_eos = torch.isin(tokens, host_tensor(list(eos), tokens.device, torch.long))
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0, is_eos.any(dim=1)


def find_stop(tokenizer: Any, ids: Sequence[int], stop_strings: Sequence[str]) -> int | None:
    """Index of the token that completes the first stop string in ``decode(ids)``, or ``None``.

    "Completes" = the shortest prefix ``ids[: j + 1]`` whose text contains a stop string (binary search:
    containment only grows with the prefix).
    """
    if not stop_strings or not ids:
        return None

    def hit(j: int) -> bool:
        text = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not hit(len(ids) - 1):
        return None
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def finalize(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    valid: torch.Tensor,
    finished: torch.Tensor,
    pad: int,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
) -> GenerationOutput:
    """Apply stop strings, pad after each end, trim to the longest response, build the output.

    Args:
        tokens, logprobs, valid: ``(b, n_max)`` sampled ids, sampler log-probs, and the pre-stop-string
            response mask (True up to and including EOS).
        finished: ``(b,)`` ended by EOS.
    """
    tokens, logprobs, valid, finished = tokens.clone(), logprobs.clone(), valid.clone(), finished.clone()
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer= to the backend")
        cpu_tokens, cpu_valid = tokens.cpu(), valid.cpu()
        for i in range(tokens.shape[0]):
            n_i = int(cpu_valid[i].sum())
            j = find_stop(tokenizer, cpu_tokens[i, :n_i].tolist(), stop_strings)
            if j is not None:
                valid[i, j + 1 :] = False
                finished[i] = True
    tokens = tokens.masked_fill(~valid, pad)
    logprobs = logprobs.float().masked_fill(~valid, 0.0)
    n = max(int(valid.sum(1).max()) if valid.numel() else 0, 1)
    tokens, logprobs, valid = tokens[:, :n], logprobs[:, :n], valid[:, :n]
    response_mask = valid.long()
    return GenerationOutput(
        sequences=torch.cat([prompt_ids, tokens.to(prompt_ids.dtype)], dim=1),
        prompt_length=prompt_ids.shape[1],
        response_mask=response_mask,
        logprobs=logprobs,
        finished=finished,
        attention_mask=torch.cat([prompt_mask.long(), response_mask], dim=1),
        info=dict(info or {}),
    )


def concat_outputs(outs: Sequence[GenerationOutput], pad: int) -> GenerationOutput:
    """Stack chunked outputs along the batch, right-padding responses to the longest ``n``."""
    if len(outs) == 1:
        return outs[0]
    n = max(o.response_mask.shape[1] for o in outs)

    def right_pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, n - x.shape[1]), value=value)

    p = outs[0].prompt_length
    resp = torch.cat([right_pad(o.responses, pad) for o in outs])
    mask = torch.cat([right_pad(o.response_mask, 0) for o in outs])
    prompts = torch.cat([o.sequences[:, :p] for o in outs])
    pmask = torch.cat([o.attention_mask[:, :p] for o in outs])
    return GenerationOutput(
        sequences=torch.cat([prompts, resp], dim=1),
        prompt_length=p,
        response_mask=mask,
        logprobs=torch.cat([right_pad(o.logprobs, 0.0) for o in outs]),
        finished=torch.cat([o.finished for o in outs]),
        attention_mask=torch.cat([pmask, mask], dim=1),
        info=dict(outs[0].info),
    )


def _clean_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre) :], True
        for mid in (".module.", "._orig_mod.", "._fsdp_wrapped_module.", "._checkpoint_wrapped_module."):
            if mid in name:
                name, changed = name.replace(mid, "."), True
    return name


def _iter_weights(weights: Weights) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(weights, nn.Module):
        return weights.state_dict().items()
    if isinstance(weights, Mapping):
        return weights.items()
    return weights


@torch.no_grad()
def load_weights_(model: nn.Module, weights: Weights) -> int:
    """Copy ``weights`` into ``model``'s parameters and buffers **in place** (storage unchanged).

    Accepts a model, a state dict or an iterable of ``(hf_name, tensor)`` (e.g. the stream of
    :func:`rlhf_kit.generation.resharding.iter_full_params`). Names may carry wrapper prefixes
    (``module.``, ``_orig_mod.``); DTensor sources are gathered with ``full_tensor()``, and DTensor
    targets (a tensor-parallel model, e.g. HF ``tp_plan="auto"``) take their own shard of the full
    tensor, cut locally on every rank (every rank must pass the same full tensors). Partial updates are
    allowed; an unknown name or a shape mismatch raises ``ValueError`` before anything is copied. The
    copies into plain tensors run as one multi-tensor copy (one launch per dtype pair on CUDA, not one per
    parameter). Returns the number copied.
    """
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    unknown: list[str] = []
    dsts: list[torch.Tensor] = []  # plain targets, copied in one multi-tensor copy from srcs
    srcs: list[torch.Tensor] = []
    sharded: list[tuple[torch.Tensor, torch.Tensor]] = []  # a tensor-parallel model (HF tp_plan)
    for name, tensor in _iter_weights(weights):
        key = _clean_name(name)
        dst = targets.get(key)
        if dst is None:
            unknown.append(name)
            continue
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if tuple(tensor.shape) != tuple(dst.shape):
            raise ValueError(
                f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dst.shape)}"
            )
        if hasattr(dst, "device_mesh"):
            sharded.append((dst, tensor))
        else:
            dsts.append(dst)
            srcs.append(tensor)
    if unknown:
        raise ValueError(
            f"update_weights: {len(unknown)} name(s) are not parameters of the backend model, "
            f"e.g. {unknown[:5]} (merge LoRA / strip peft prefixes with resharding.iter_full_params)"
        )
    for dst, tensor in sharded:  # this rank's shard of each full tensor
        _copy_into_dtensor_(dst, tensor)
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    return len(dsts) + len(sharded)


@torch.no_grad()
def _copy_into_dtensor_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy rank's shard of ``full`` (the global tensor, the same on every rank) into DTensor ``dst``."""
    from torch.distributed.tensor import distribute_tensor

    src = full.to(device=dst.device, dtype=dst.dtype)
    shard = distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None)  # no communication
    dst.to_local().copy_(shard.to_local())
