"""Padding-free (packed) forward passes through variable-length flash attention.

PPO scores and trains on rows of ``prompt + response`` with left padding before the prompt and right
padding after EOS; every padded slot costs a full forward and backward. Packed, each row's real tokens
(one contiguous run, as :mod:`rlhf_kit.models.layout` requires) are laid end to end in a ``(1, N)``
sequence, position ids restart at 0 for each row, and attention is causal *within* each row:
variable-length flash attention (aten's ``_flash_attention_forward``, called directly) on CUDA, one
SDPA call under a block-diagonal causal mask elsewhere. The total is rounded up to a multiple of
``multiple`` with a filler row, so compiled blocks see few distinct shapes.

:mod:`rlhf_kit.models.packing` (the reward model's packed pairs) relies on transformers detecting the
restarting position ids instead, which under SDPA builds a dense ``(N, N)`` block-diagonal mask: fine at a
reward model's token budgets, quadratic in ``N``. Here the attention function is registered with
transformers as ``"rlhf_kit_packed"``; transformers builds no mask for an implementation it has no mask
function for, and passes ``cu_seq_lens_q``/``max_length_q`` given to the model's forward through to the
attention (the names its own flash attention uses). :func:`packed_attention` switches a model to it for
the duration of a forward.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from rlhf_kit.models.transfer import host_tensor

IMPLEMENTATION = "rlhf_kit_packed"

# aten's flash-attention forward, called directly: it takes packed ``(N, heads, d)`` rows with their
# boundaries, is causal within each row, serves fewer key/value heads natively, and autograd differentiates
# it through its own formula (``_flash_attention_backward``). ``torch.nn.attention.varlen.varlen_attn``
# wraps the same kernel in a Python custom op: a Python layer on every forward and backward call (about
# 0.1 ms each in session 26's profile of PPO), an extra kernel for its RNG state, and, before torch 2.12,
# no grouped-query attention, so keys and values were repeated per query head (two more kernels forward,
# two reductions backward).
_FLASH_FORWARD = getattr(torch.ops.aten, "_flash_attention_forward", None)
# built with flash attention (a constant, so a compiled block reads it without a guard on the device)
_FLASH = _FLASH_FORWARD is not None and torch.backends.cuda.is_flash_attention_available()


@functools.lru_cache(maxsize=16)
def _flash_device(device_index: int | None) -> bool:
    """Whether flash attention runs on this CUDA device (Ampere or later), for ``"auto"`` to decide
    outside any compiled code; on an older one, ``"on"`` fails in the flash kernel."""
    return _FLASH and torch.cuda.get_device_capability(device_index) >= (8, 0)


def _varlen_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, m: int, scale: float | None
) -> torch.Tensor:
    """Flash attention of ``(N, heads, d)`` rows (``k``/``v`` may have fewer heads, dividing ``q``'s),
    causal within each row that ``cu`` bounds; ``m`` bounds the longest row. Returns ``(N, heads, d)``."""
    out = _FLASH_FORWARD(q, k, v, cu, cu, m, m, 0.0, True, False, scale=scale)
    return out[0]


#: Model types whose packed passes are tested equal to the padded ones (tests/unit/models/test_varlen.py).
PACKED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")


def _submodules(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and every module below it, as ``model.modules()`` but without building names: it runs
    before every packed forward, where ``modules()`` plus ``hasattr`` (which goes through
    ``nn.Module.__getattr__``'s failing lookup on most modules) cost about 0.4 ms per walk of a 24-layer
    model; this costs about a tenth of that. A module shared by two parents is visited twice."""
    stack = [model]
    while stack:
        m = stack.pop()
        yield m
        stack.extend(c for c in m._modules.values() if c is not None)


@dataclass
class _Walk:
    """What one walk of a model finds (:func:`_walk`)."""

    configs: dict[int, Any]  # every distinct config object, by id
    fsdp: nn.Module | None  # the first FSDP2 module met, root first
    checkpointed: list[nn.Module]  # layers under transformers' gradient checkpointing


def _walk(model: nn.Module) -> _Walk:
    """One walk of ``model``'s modules for everything a packed forward asks: its configs (a wrapper and its
    backbone may hold the same one; a module's own ``config`` attribute, or a ``config`` property of its
    class, that is a transformers ``PretrainedConfig``), its first FSDP2 module, and its
    gradient-checkpointed layers (transformers sets both attributes on the layer itself). A packed forward
    walks twice (:func:`use_packed`, :func:`packed_attention`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support has no FSDP2 module to find
        FSDPModule = ()  # noqa: N806  (isinstance against no class: never true)

    configs: dict[int, Any] = {}
    fsdp = None
    checkpointed = []
    for m in _submodules(model):
        own = vars(m)
        cfg = own.get("config")
        if cfg is None and isinstance(getattr(type(m), "config", None), property):
            cfg = m.config
        if isinstance(cfg, PretrainedConfig):  # not another library's (torchao's Float8Linear has a config)
            configs[id(cfg)] = cfg
        if fsdp is None and isinstance(m, FSDPModule):
            fsdp = m
        if own.get("gradient_checkpointing") is True and "_gradient_checkpointing_func" in own:
            checkpointed.append(m)
    return _Walk(configs, fsdp, checkpointed)


def _configs(model: nn.Module) -> dict[int, Any]:
    """Every distinct config object in ``model`` (:func:`_walk`)."""
    return _walk(model).configs


def unsupported_reason(model: nn.Module, width: int) -> str | None:
    """Why ``model`` cannot run packed rows of up to ``width`` tokens exactly, or None when it can: its
    model type is not among :data:`PACKED_MODEL_TYPES`, or a sliding window shorter than ``width`` is on
    (the packed attention is plainly causal)."""
    return _unsupported(_configs(model), width)


def _unsupported(configs: dict[int, Any], width: int) -> str | None:
    for cfg in configs.values():
        kind = getattr(cfg, "model_type", None)
        if kind not in PACKED_MODEL_TYPES:
            return f"model type {kind!r} is not verified for packed passes ({', '.join(PACKED_MODEL_TYPES)})"
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and window < width:
            return f"its sliding window ({window}) is shorter than the rows ({width} tokens)"
    return None


def use_packed(setting: bool | str, model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether a forward of ``input_ids (b, t)`` through ``model`` runs packed under ``setting``:
    ``"off"``/False never; ``"on"``/True always (``ValueError`` when :func:`unsupported_reason` objects);
    ``"auto"`` where it is exact and fast: a supported model at least :data:`PACKED_AUTO_MIN_HIDDEN` wide,
    on CUDA with flash attention (Ampere or later), computing in bf16/fp16 (:func:`_half_compute`; elsewhere
    the packed attention builds an ``(N, N)`` mask: for tests, not speed)."""
    if setting in (False, "off"):
        return False
    if setting not in (True, "on", "auto"):
        raise ValueError(f"packed must be 'auto', 'on' or 'off' (or a bool), got {setting!r}")
    found = _walk(model)
    reason = _unsupported(found.configs, input_ids.shape[1])
    if setting != "auto":
        if reason:
            raise ValueError(f"packed passes are on, but {reason}")
        return True
    dev = input_ids.device
    if reason is not None or dev.type != "cuda" or not _flash_device(dev.index):
        return False
    return _hidden_size(found.configs) >= PACKED_AUTO_MIN_HIDDEN and _half_compute(model, found, dev.type)


#: ``"auto"`` packs models at least this wide (``hidden_size``). Narrower ones run launch-bound kernels,
#: where the packing's gathers cost more than the padding they skip: SmolLM2-135M (576 wide, 30 layers)
#: scored 42% and trained 61% slower packed; 1024 wide was a tie (0.76 GiB less memory), 2048 wide 4.7%
#: faster (docs/benchmarks.md, sessions 19 and 22).
PACKED_AUTO_MIN_HIDDEN = 1024


def _hidden_size(configs: dict[int, Any]) -> int:
    """The widest ``hidden_size`` (or GPT-2's ``n_embd``) among ``configs`` (0 if none names one)."""
    sizes = [getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0) for c in configs.values()]
    return max([int(s) for s in sizes if isinstance(s, int)], default=0)


def _half_compute(model: nn.Module, found: _Walk, device_type: str) -> bool:
    """Whether the attention will see bf16/fp16: autocast, an FSDP2 mixed-precision policy that computes in
    half precision (its parameters stay fp32 shards), or half-precision weights."""
    half = (torch.bfloat16, torch.float16)
    if torch.is_autocast_enabled(device_type):
        return True
    if found.fsdp is not None:
        policy = getattr(found.fsdp._get_fsdp_state(), "_mp_policy", None)
        return getattr(policy, "param_dtype", None) in half
    return next(model.parameters()).dtype in half


@dataclass
class Packing:
    """Where each row's real tokens go in the packed sequence.

    ``lengths (b,)``: real tokens per row (after :meth:`~rlhf_kit.models.layout.LeftAlignment.align`, a
    row's real tokens are its first ``lengths[r]`` columns); ``starts (b,)``: each row's first packed
    position; ``cu_seqlens (b + 2,)`` int32: the boundaries of the rows and of the filler row;
    ``total``: the packed length (a multiple of the ``multiple`` it was built with); ``max_len``: an upper
    bound of the longest row (filler included), rounded up to that multiple as well: the flash kernel
    only sizes its grid by it, and a compiled block specialises on the integer, so few distinct values
    mean few recompilations.
    """

    lengths: torch.Tensor
    starts: torch.Tensor
    cu_seqlens: torch.Tensor
    total: int
    max_len: int

    def pack(self, x: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """``x (b, t, ...)``, front-aligned rows, as ``(1, total, ...)``: row ``r``'s first ``lengths[r]``
        columns from ``starts[r]`` on, ``fill`` after the last row. One gather of fixed shape: no read of
        the lengths on the host (a boolean selection would wait for the device)."""
        b, t = x.shape[:2]
        cu = self.cu_seqlens.to(x.device).long()
        pos = torch.arange(self.total, device=x.device)
        row = (torch.searchsorted(cu[: b + 1], pos, right=True) - 1).clamp(max=b - 1)  # filler -> last row
        col = (pos - cu[row]).clamp(max=t - 1)
        real = (pos < cu[b]).view(-1, *[1] * (x.dim() - 2))
        return torch.where(real, x[row, col], fill)[None]

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """``(1, total)``: ``0 .. lengths[r] - 1`` for each row, then ``0 ..`` for the filler."""
        pos = torch.arange(self.total, device=device)
        seg = torch.searchsorted(self.cu_seqlens.to(device).long(), pos, right=True) - 1
        return (pos - self.cu_seqlens.to(device).long()[seg])[None]

    def index(self, cols: torch.Tensor) -> torch.Tensor:
        """Packed positions ``(b, n)`` of the front-aligned columns ``cols (b, n)`` of each row (clamped into
        the row, so columns past a row's end land on its last token: callers mask those out)."""
        lengths = self.lengths.to(cols.device)
        inside = cols.clamp(min=0).minimum((lengths - 1).clamp(min=0)[:, None])
        return self.starts.to(cols.device)[:, None] + inside

    def forward_kwargs(self, device: torch.device) -> dict[str, Any]:
        """The keyword arguments of a packed model forward (transformers passes them to the attention)."""
        cu = self.cu_seqlens.to(device)
        return {
            "position_ids": self.position_ids(device),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": self.max_len,
            "max_length_k": self.max_len,
        }


def packing(lengths: torch.Tensor, multiple: int = 64, host: Sequence[int] | None = None) -> Packing:
    """The :class:`Packing` of rows with ``lengths (b,)`` real tokens, the total rounded up to a multiple
    of ``multiple`` by a filler row. One device-to-host read of ``lengths``, unless ``host`` gives them
    already (:attr:`rlhf_kit.models.layout.LeftAlignment.lengths`)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    host = [int(n) for n in (lengths.tolist() if host is None else host)]
    if len(host) != lengths.shape[0]:
        raise ValueError(f"host lengths for {len(host)} rows, but lengths has {lengths.shape[0]}")
    real = sum(host)
    total = max(multiple, -(-real // multiple) * multiple)
    bounds = [0]
    for n in host:
        bounds.append(bounds[-1] + n)
    filler = total - real
    if filler:
        bounds.append(total)
    cu = host_tensor(bounds, lengths.device, torch.int32)  # no wait for the device (models/transfer.py)
    return Packing(
        lengths=lengths.long(),
        starts=cu[: len(host)].long(),
        cu_seqlens=cu,
        total=total,
        max_len=min(total, -(-max([*host, filler, 1]) // multiple) * multiple),
    )


def packed_row_kwargs(
    position_ids: torch.Tensor, multiple: int = 64, device: torch.device | str | None = None
) -> dict[str, Any]:
    """The variable-length attention's keyword arguments (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``)
    of a row that is already packed, ``position_ids (1, T)`` restarting at 0 for each sequence (e.g.
    :class:`~rlhf_kit.data.collators.PackedSFTCollator`). The longest sequence is rounded up to
    ``multiple`` (at most ``T``), as in :func:`packing`. Give the collator's host ``position_ids`` and
    the model's ``device``: the boundaries are then found on the host, and only the result is copied
    (asynchronously); ``position_ids`` on a GPU costs reads that wait for the device."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"a packed row has position_ids of shape (1, T), got {tuple(position_ids.shape)}")
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("a packed row's position_ids must start at 0")
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    m = min(pos.numel(), -(-longest // multiple) * multiple)
    if device is not None:
        cu = host_tensor(cu, device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed row: ``query (1, h, N, d)``, ``key``/``value (1, h_kv, N, d)``
    -> ``(1, N, h, d)`` (a transformers attention function). Needs ``cu_seq_lens_q`` and
    ``max_length_q`` from the forward's keyword arguments; ``attention_mask`` must be None."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[0] != 1:
        raise ValueError("the packed attention needs one packed row, cu_seq_lens_q, and no attention mask")
    if dropout:
        raise ValueError("the packed attention has no dropout (PPO runs its models without it)")
    h, h_kv = query.shape[1], key.shape[1]
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # (N, heads, d)
    if _FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _varlen_causal(q, k, v, cu, int(kwargs["max_length_q"]), scaling)[None], None
    if h != h_kv:  # grouped-query attention: each KV head serves h / h_kv query heads
        k, v = (t.repeat_interleave(h // h_kv, dim=1) for t in (k, v))
    # elsewhere one SDPA call under a block-diagonal causal mask (no host read of the boundaries, so it
    # traces under torch.compile; memory quadratic in N: this path is for tests and CPU runs, not speed)
    pos = torch.arange(q.shape[0], device=q.device)
    seg = torch.searchsorted(cu.to(q.device), pos, right=True)
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scaling
    ).transpose(0, 1)
    return out[None], None


def register() -> str:
    """Register :func:`packed_attention_forward` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, packed_attention_forward)
    return IMPLEMENTATION


@contextlib.contextmanager
def _implementation(configs: dict[int, Any], implementation: str) -> Iterator[None]:
    """Every config in ``configs`` names ``implementation`` while active (restored after)."""
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = implementation
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _checkpoint_within(checkpoint: Any, configs: dict[int, Any], implementation: str, function: Any,
                       *args: Any, **kwargs: Any) -> Any:  # fmt: skip
    """A layer's gradient-checkpointing function whose ``function`` runs with ``implementation`` named in
    ``configs`` every time it runs: in the forward, and again when the backward pass recomputes the layer
    (after :func:`packed_attention` has exited). Where the configs already name it (the forward; also
    what ``torch.compile`` traces) nothing is switched."""

    def run(*a: Any, **kw: Any) -> Any:
        if all(c._attn_implementation == implementation for c in configs.values()):
            return function(*a, **kw)
        with _implementation(configs, implementation):
            return function(*a, **kw)

    return checkpoint(run, *args, **kwargs)


# layer -> (its own checkpoint function, the configs' ids, implementation, the wrapper): one wrapper per
# layer and setting, so a compiled block sees the same function on every packed pass (no recompilation)
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def _wrapped_checkpoint(layer: nn.Module, configs: dict[int, Any], implementation: str) -> Any:
    own = layer._gradient_checkpointing_func
    key = (tuple(configs), implementation)
    cached = _WRAPPED.get(layer)
    if cached is not None and own is cached[-1]:  # nested: already wrapped
        return own
    if cached is None or cached[0] is not own or cached[1:3] != key:
        cached = (own, *key, functools.partial(_checkpoint_within, own, configs, implementation))
        _WRAPPED[layer] = cached
    return cached[-1]


@contextlib.contextmanager
def packed_attention(model: nn.Module, implementation: str = IMPLEMENTATION) -> Iterator[None]:
    """While active, every config in ``model`` names the packed attention (or another ``implementation``
    registered without a mask function) as its attention implementation.

    Layers under transformers' gradient checkpointing are recomputed in the backward pass, after this
    context has exited: while it is active, each such layer's checkpoint function is one that switches to
    ``implementation`` again for the recomputation of a layer run here (exact gradients, reentrant or
    not)."""
    register()
    found = _walk(model)
    configs, layers = found.configs, found.checkpointed
    saved = [m._gradient_checkpointing_func for m in layers]
    try:
        for m in layers:
            m._gradient_checkpointing_func = _wrapped_checkpoint(m, configs, implementation)
        with _implementation(configs, implementation):
            yield
    finally:
        for m, own in zip(layers, saved):
            m._gradient_checkpointing_func = own
