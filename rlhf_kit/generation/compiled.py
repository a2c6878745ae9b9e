"""A fast generation backend: static KV cache, a fixed-shape decode step, CUDA graphs, on-device sampling.

How it works
------------
* The HF model runs with a custom attention implementation (registered in transformers'
  ``AttentionInterface`` as ``"rlhf_kit_static_kv"``). While a :class:`_KVState` is active, that function
  writes each layer's keys/values into preallocated ``(B, kv_heads, L, head_dim)`` buffers and attends
  over them; otherwise it defers to HF's SDPA attention, so the model stays usable for anything else.
* The model is called with ``past_key_values=None`` and a ready 4D additive mask (which HF passes
  through untouched), and explicit ``position_ids`` derived from the left-padded prompt mask.
* Prefill (the whole prompt) runs eagerly. Each decode step (one token for the whole batch) is a
  function of fixed shapes that only updates static buffers in place: token in, KV write at slot
  ``cache_pos``, logits, sampling (temperature, min-new-tokens EOS masking, top-k, top-p, greedy, or the
  exponential-race draw ``argmax(p / E)``), and the outputs written at column ``step``. On CUDA the step
  is compiled with ``torch.compile`` (Inductor, no own graphs) and captured once per
  ``(batch bucket, sampling flags)`` in a CUDA graph, so a decode step costs one graph launch.
* Batches are padded up to a bucket size; the host checks "all finished?" only every ``check_every``
  steps to avoid a device sync per token.

Supported: the decoder families of :data:`rlhf_kit.tiny.FAMILIES` (llama, mistral, qwen2, gpt2,
gpt_neox). Sequences longer than a model's sliding window are refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_kit.generation.base import (
    GenerationOutput,
    SamplingParams,
    Weights,
    check_prompts,
    concat_outputs,
    eos_ids,
    finalize,
    load_weights_,
    pad_id,
)

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "rlhf_kit_static_kv"


# ----------------------------------------------------------------------------------------------------
# sampling (pure tensor functions, used inside the captured step and in tests)


def filter_top_k_top_p(
    scores: torch.Tensor, top_k: torch.Tensor | int, top_p: torch.Tensor | float, use_k: bool, use_p: bool
) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to ``-inf``; ``scores (b, v)`` float32.

    Top-k keeps the ``k`` best tokens; top-p then keeps the smallest set of best tokens whose
    (renormalised) mass reaches ``top_p``, i.e. drops a token when the mass strictly before it is
    ``>= top_p`` (the best token is always kept). Same order and boundary as HF's warpers. ``top_k`` and
    ``top_p`` may be 0-d tensors so a captured graph serves any value.
    """
    if not (use_k or use_p):
        return scores
    sorted_s, idx = scores.sort(dim=-1, descending=True)
    v = scores.shape[-1]
    remove = torch.zeros_like(sorted_s, dtype=torch.bool)
    if use_k:
        remove = torch.arange(v, device=scores.device).expand_as(sorted_s) >= top_k
        sorted_s = sorted_s.masked_fill(remove, float("-inf"))
    if use_p:
        probs = torch.softmax(sorted_s, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        remove = remove | (before >= top_p)
        remove[..., 0] = False
        sorted_s = sorted_s.masked_fill(remove, float("-inf"))
    return torch.empty_like(scores).scatter_(-1, idx, sorted_s)


def sample_from_scores(scores: torch.Tensor, greedy: bool) -> torch.Tensor:
    """``(b,)`` token ids: argmax, or a draw from ``softmax(scores)`` by the race ``argmax(p / E)``,
    ``E ~ Exp(1)`` (one kernel-friendly pass, no CPU sync, valid inside CUDA graphs)."""
    if greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    race = torch.empty_like(probs).exponential_()
    return (probs / race).argmax(dim=-1)


@dataclass(frozen=True)
class _Flags:
    """The static part of a sampling configuration (one compiled step / graph per distinct value)."""

    greedy: bool
    top_k: bool
    top_p: bool
    min_new: bool
    eos: bool


# ----------------------------------------------------------------------------------------------------
# KV state and the attention function


class _KVState:
    """Per-layer static KV buffers ``(max_batch, kv_heads, L, head_dim)`` plus the write slot."""

    def __init__(self, max_batch: int, max_len: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.max_len = max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            # zeros, not empty: masked slots are multiplied by 0 in P @ V, and 0 * NaN would be NaN
            shape = (self.max_batch, like.shape[1], self.max_len, like.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


_ACTIVE: _KVState | None = None


@contextlib.contextmanager
def _activate(state: _KVState) -> Iterator[None]:
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, state
    try:
        yield
    finally:
        _ACTIVE = prev


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def static_kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: static-cache attention when a state is active, else SDPA.

    ``query (b, h, q, d)``, ``key``/``value (b, kv, q, d)``; returns ``(b, q, h, d)``. With ``q == 1``
    (decode) the new key/value go to slot ``cache_pos`` and the query's heads are grouped per KV head
    (``(b, kv, h / kv, d)``), so grouped-query attention reads the cache once, without repeating it.
    """
    state = _ACTIVE
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    k_buf, v_buf = state.buffers(module.layer_idx, key)
    k_buf, v_buf = k_buf[:b], v_buf[:b]
    if q_len == 1:
        k_buf.index_copy_(2, state.cache_pos, key)
        v_buf.index_copy_(2, state.cache_pos, value)
        grouped = query.reshape(b, kv, h // kv, d)
        out = F.scaled_dot_product_attention(grouped, k_buf, v_buf, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, 1, h, d), None
    k_buf[:, :, :q_len].copy_(key)
    v_buf[:, :, :q_len].copy_(value)
    k, v = _repeat_kv(key, h // kv), _repeat_kv(value, h // kv)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    """Register the attention function, and SDPA's mask builder under the same name so that outside
    generation (no active state) the model gets exactly the masks -- padding included -- of ``"sdpa"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, static_kv_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ----------------------------------------------------------------------------------------------------
# per-bucket static buffers


class _Buffers:
    """Static tensors of one batch bucket: every decode-step input and output lives here."""

    def __init__(self, b: int, max_len: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        kw = dict(device=device)
        self.b = b
        self.tok = torch.zeros(b, 1, dtype=torch.long, **kw)
        self.pos = torch.zeros(b, 1, dtype=torch.long, **kw)
        self.mask = torch.zeros(b, 1, 1, max_len, dtype=dtype, **kw)
        self.finished = torch.zeros(b, dtype=torch.bool, **kw)
        self.out_tok = torch.zeros(b, max_len, dtype=torch.long, **kw)
        self.out_lp = torch.zeros(b, max_len, dtype=torch.float32, **kw)
        self.out_valid = torch.zeros(b, max_len, dtype=torch.bool, **kw)
        self.step = torch.zeros((), dtype=torch.long, **kw)
        self.temperature = torch.ones((), dtype=torch.float32, **kw)
        self.top_k = torch.zeros((), dtype=torch.long, **kw)
        self.top_p = torch.ones((), dtype=torch.float32, **kw)
        self.min_new = torch.zeros((), dtype=torch.long, **kw)
        self.pad = torch.zeros((), dtype=torch.long, **kw)
        self.eos_onehot = torch.zeros(vocab, dtype=torch.bool, **kw)


def _default_buckets(max_batch_size: int) -> tuple[int, ...]:
    sizes = {max_batch_size}
    s = 8
    while s < max_batch_size:
        sizes.add(s)
        s *= 2
    return tuple(sorted(sizes))


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return int(window)


class CompiledBackend:
    """Static-cache generation with a compiled, CUDA-graph-captured decode step (see module docstring).

    Args:
        model: a HF causal LM that becomes this backend's own inference copy (set to eval, its attention
            implementation switched to ``"rlhf_kit_static_kv"``, which is plain SDPA outside generation).
            Pass a dedicated copy (e.g. ``copy.deepcopy`` or ``from_config`` + ``update_weights``).
        max_batch_size: largest bucket; bigger batches are generated in chunks.
        max_seq_len: KV slots per sequence (prompt width + new tokens - 1 must fit); rounded up to 64.
            Default: ``min(max_position_embeddings, 2048)``.
        compile: ``torch.compile`` the decode step: ``True``, ``False`` or ``"auto"`` (on CUDA only).
        cuda_graphs: capture the decode step in CUDA graphs: ``True``, ``False`` or ``"auto"`` (on CUDA).
        batch_buckets: allowed padded batch sizes (default 8, 16, 32, ... up to ``max_batch_size``).
        tokenizer: needed only for ``stop_strings``.
        check_every: host check of "all finished" (and stop strings) every this many steps.
        compile_options: extra ``torch.compile`` keyword arguments (e.g. ``{"fullgraph": True}``).
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int = 64,
        max_seq_len: int | None = None,
        compile: bool | str = "auto",
        cuda_graphs: bool | str = "auto",
        batch_buckets: tuple[int, ...] | None = None,
        tokenizer: Any = None,
        check_every: int = 16,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        for name, val in (("compile", compile), ("cuda_graphs", cuda_graphs)):
            if val not in (True, False, "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {val!r}")
        _register_attention()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.tokenizer = tokenizer
        self.check_every = check_every
        self.compile_options = dict(compile_options or {})
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        on_cuda = self.device.type == "cuda"
        self.use_compile = on_cuda if compile == "auto" else bool(compile)
        self.use_graphs = on_cuda if cuda_graphs == "auto" else bool(cuda_graphs)
        if self.use_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = min(int(getattr(cfg, "max_position_embeddings", 2048) or 2048), 2048)
        self.max_seq_len = int(math.ceil(max_seq_len / 64) * 64)
        window = _sliding_window(cfg)
        if window is not None and self.max_seq_len > window:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} exceeds the model's sliding window {window}; "
                "this backend implements full attention only"
            )
        buckets = tuple(sorted(set(batch_buckets))) if batch_buckets else _default_buckets(max_batch_size)
        if buckets[-1] > max_batch_size or buckets[0] < 1:
            raise ValueError(f"batch_buckets {buckets} must lie in [1, max_batch_size={max_batch_size}]")
        self.buckets = buckets
        self.max_batch_size = buckets[-1]
        out_emb = model.get_output_embeddings()
        self.vocab = int(out_emb.weight.shape[0]) if out_emb is not None else int(cfg.vocab_size)
        self._state: _KVState | None = None
        self._bufs: dict[int, _Buffers] = {}
        self._graphs: dict[tuple[int, _Flags], Any] = {}
        self._graph_pool: Any = None
        self._compiled: Any = None
        self.mode = "eager"  # what the last decode loop ran: eager / compiled / graph / compiled+graph

    # -- memory ---------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Allocate the KV cache and buffers for the largest bucket (otherwise done lazily)."""
        self._ensure_state()
        self._buffers(self.max_batch_size)

    def sleep(self) -> None:
        """Free the KV cache, the static buffers and the captured graphs (weights stay)."""
        self._graphs.clear()
        self._bufs.clear()
        self._state = None
        self._graph_pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV cache now (0 while asleep or before the first call)."""
        return self._state.nbytes() if self._state is not None else 0

    def update_weights(self, weights: Weights) -> int:
        """Copy new weights into the backend's model in place, so captured graphs stay valid."""
        return load_weights_(self.model, weights)

    # -- internals ------------------------------------------------------------------------------------

    def _ensure_state(self) -> _KVState:
        if self._state is None:
            self._state = _KVState(self.max_batch_size, self.max_seq_len, self.device)
        return self._state

    def _buffers(self, b: int) -> _Buffers:
        if b not in self._bufs:
            self._bufs[b] = _Buffers(b, self.max_seq_len, self.vocab, self.dtype, self.device)
        return self._bufs[b]

    def _bucket(self, b: int) -> int:
        return next(s for s in self.buckets if s >= b)

    def _sample_into(self, logits: torch.Tensor, bufs: _Buffers, flags: _Flags) -> None:
        """Sample one token per row from ``logits (b, v)`` and write it at column ``bufs.step``."""
        scaled = logits.float() / bufs.temperature
        logp_all = torch.log_softmax(scaled, dim=-1)
        scores = scaled
        if flags.min_new:
            block = bufs.eos_onehot & (bufs.step < bufs.min_new)
            scores = scores.masked_fill(block, float("-inf"))
        scores = filter_top_k_top_p(scores, bufs.top_k, bufs.top_p, flags.top_k, flags.top_p)
        tok = sample_from_scores(scores, flags.greedy)
        lp = logp_all.gather(-1, tok[:, None]).squeeze(-1)
        done = bufs.finished
        tok = torch.where(done, bufs.pad, tok)
        lp = torch.where(done, torch.zeros_like(lp), lp)
        col = bufs.step.view(1)
        bufs.out_tok.index_copy_(1, col, tok[:, None])
        bufs.out_lp.index_copy_(1, col, lp[:, None])
        bufs.out_valid.index_copy_(1, col, (~done)[:, None])
        if flags.eos:
            bufs.finished.copy_(done | bufs.eos_onehot[tok])
        bufs.tok.copy_(tok[:, None])

    def _decode_step(self, b: int, flags: _Flags) -> None:
        """One token for the whole bucket; reads and writes only static tensors (graph-capturable)."""
        bufs = self._bufs[b]
        state = self._state
        assert state is not None
        bufs.mask.index_fill_(-1, state.cache_pos, 0.0)  # the slot written this step becomes visible
        out = self.model(input_ids=bufs.tok, position_ids=bufs.pos, attention_mask=bufs.mask, use_cache=False)
        self._sample_into(out.logits[:, -1, :], bufs, flags)
        bufs.pos.add_(1)
        bufs.step.add_(1)
        state.cache_pos.add_(1)

    def _step_fn(self) -> Any:
        if not self.use_compile:
            return self._decode_step
        if self._compiled is None:
            # one compilation per (bucket, sampling flags, model class): allow more than dynamo's default
            import torch._dynamo

            cfg = torch._dynamo.config
            limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, limit_name, max(getattr(cfg, limit_name), 64))
            opts = {"dynamic": False, **self.compile_options}
            self._compiled = torch.compile(self._decode_step, **opts)
        return self._compiled

    def _graph_for(self, b: int, flags: _Flags) -> Any:
        """Capture (once) the decode step of bucket ``b``; warm-up runs on throwaway state."""
        key = (b, flags)
        if key in self._graphs:
            return self._graphs[key]
        fn = self._step_fn()
        state, bufs = self._ensure_state(), self._buffers(b)
        state.cache_pos.zero_()
        bufs.step.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), _activate(state):
            for _ in range(3):
                fn(b, flags)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool), _activate(state):
            fn(b, flags)
        self._graphs[key] = graph
        return graph

    def _prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, bufs: _Buffers, flags: _Flags, state: _KVState
    ) -> None:
        """Run the prompt, sample token 0, and set up positions, slot and the decode mask."""
        b, p = ids.shape
        neg = torch.finfo(self.dtype).min
        valid = mask.bool()
        causal = torch.ones(p, p, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & valid[:, None, :]
        allowed |= torch.eye(p, dtype=torch.bool, device=self.device)[None]  # pad rows see themselves
        prefill_mask = torch.zeros(b, 1, p, p, dtype=self.dtype, device=self.device)
        prefill_mask.masked_fill_(~allowed[:, None], neg)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with _activate(state):
            out = self.model(
                input_ids=ids,
                position_ids=position_ids,
                attention_mask=prefill_mask,
                use_cache=False,
                logits_to_keep=1,
            )
        bufs.step.zero_()
        self._sample_into(out.logits[:, -1, :], bufs, flags)
        bufs.step.fill_(1)
        bufs.pos.copy_(mask.long().sum(-1, keepdim=True))
        bufs.mask.fill_(neg)
        bufs.mask[:, 0, 0, :p].masked_fill_(valid, 0.0)
        state.cache_pos.fill_(p)

    def _set_params(self, bufs: _Buffers, params: SamplingParams, eos: list[int], pad: int) -> _Flags:
        bufs.temperature.fill_(params.temperature)
        bufs.top_k.fill_(params.top_k)
        bufs.top_p.fill_(params.top_p)
        bufs.min_new.fill_(params.min_new_tokens)
        bufs.pad.fill_(pad)
        bufs.eos_onehot.zero_()
        if eos:
            bufs.eos_onehot[torch.tensor([e for e in eos if e < self.vocab], dtype=torch.long)] = True
        return _Flags(
            greedy=params.greedy,
            top_k=params.top_k > 0 and not params.greedy,
            top_p=params.top_p < 1.0 and not params.greedy,
            min_new=params.min_new_tokens > 0 and bool(eos),
            eos=bool(eos),
        )

    def _check_stops(self, bufs: _Buffers, n_rows: int, upto: int, params: SamplingParams) -> None:
        """Mark rows whose text so far contains a stop string as finished (host side)."""
        from rlhf_kit.generation.base import find_stop

        toks = bufs.out_tok[:n_rows, :upto].cpu()
        valid = bufs.out_valid[:n_rows, :upto].cpu()
        done = bufs.finished[:n_rows].cpu()
        for i in range(n_rows):
            if done[i]:
                continue
            n_i = int(valid[i].sum())
            if find_stop(self.tokenizer, toks[i, :n_i].tolist(), params.stop_strings) is not None:
                bufs.finished[i] = True

    @torch.no_grad()
    def _generate_chunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> GenerationOutput:
        n_rows, p = input_ids.shape
        n_new = params.max_new_tokens
        if p + n_new - 1 > self.max_seq_len:
            raise ValueError(
                f"prompt width {p} + max_new_tokens {n_new} - 1 exceeds max_seq_len {self.max_seq_len}"
            )
        cfg = self.model.config
        eos, pad = eos_ids(params, cfg), pad_id(params, cfg)
        b = self._bucket(n_rows)
        state, bufs = self._ensure_state(), self._buffers(b)
        flags = self._set_params(bufs, params, eos, pad)
        graph = self._graph_for(b, flags) if self.use_graphs else None
        if params.seed is not None:  # after capture: warm-up steps draw random numbers too
            torch.manual_seed(params.seed)
        ids = torch.full((b, p), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((b, p), dtype=torch.long, device=self.device)
        ids[:n_rows], mask[:n_rows] = input_ids.to(self.device), attention_mask.to(self.device)
        bufs.finished.zero_()
        bufs.finished[n_rows:] = True  # bucket padding rows never block the early exit
        bufs.out_valid.zero_()
        self._prefill(ids, mask, bufs, flags, state)
        step_fn = self._step_fn()
        stop_check = bool(params.stop_strings)
        can_exit = flags.eos or stop_check
        done_steps = 1
        with _activate(state):
            while done_steps < n_new:
                if graph is not None:
                    graph.replay()
                else:
                    step_fn(b, flags)
                done_steps += 1
                if can_exit and done_steps % self.check_every == 0:
                    if stop_check:
                        self._check_stops(bufs, n_rows, done_steps, params)
                    if bool(bufs.finished.all()):
                        break
        self.mode = ("compiled" if self.use_compile else "eager") + ("+graph" if graph is not None else "")
        valid = bufs.out_valid[:n_rows, :done_steps].clone()
        tokens = bufs.out_tok[:n_rows, :done_steps].clone()
        logp = bufs.out_lp[:n_rows, :done_steps].clone()
        ended = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        if eos:
            is_eos = torch.isin(tokens, torch.tensor(eos, device=self.device)) & valid
            ended = is_eos.any(1)
        out = finalize(
            input_ids,
            attention_mask,
            tokens.to(input_ids.device),
            logp.to(input_ids.device),
            valid.to(input_ids.device),
            ended.to(input_ids.device),
            pad,
            params.stop_strings,
            self.tokenizer,
            info={"backend": "compiled", "mode": self.mode, "bucket": b, "steps": done_steps},
        )
        return out

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> GenerationOutput:
        """Sample up to ``params.max_new_tokens`` for left-padded ``(b, p)`` prompts (chunks of
        ``max_batch_size``); output on the device of ``input_ids``."""
        check_prompts(input_ids, attention_mask)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: CompiledBackend(model, tokenizer=...)")
        outs = [
            self._generate_chunk(
                input_ids[s : s + self.max_batch_size], attention_mask[s : s + self.max_batch_size], params
            )
            for s in range(0, input_ids.shape[0], self.max_batch_size)
        ]
        return concat_outputs(outs, pad_id(params, self.model.config))
