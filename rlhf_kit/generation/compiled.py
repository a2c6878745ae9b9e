"""A fast generation backend: static KV cache, a fixed-shape decode step, CUDA graphs, on-device sampling.

How it works
------------
* The HF model runs with a custom attention implementation (registered in transformers'
  ``AttentionInterface`` as ``"rlhf_kit_static_kv"``). While a :class:`_KVState` is active, that function
  writes each layer's keys/values into preallocated ``(B, kv_heads, L, head_dim)`` buffers and attends
  over them; otherwise it defers to HF's SDPA attention, so the model stays usable for anything else.
* The model is called with ``past_key_values=None`` and a ready 4D additive mask (which HF passes
  through untouched), and explicit ``position_ids`` derived from the left-padded prompt mask.
* Prefill (the whole prompt) runs through the same compiled blocks under ``compile_scope="blocks"``
  (eagerly otherwise): the prompt width is rounded up to a multiple of :data:`PREFILL_ALIGN` (more left
  padding, masked) so a run compiles the block for a few prefill shapes, at most
  :data:`MAX_PREFILL_SHAPES` (later new shapes run eagerly).
* Each decode step (one token for the whole batch) is a function of fixed shapes that only updates
  static buffers in place: token in, KV write at slot ``cache_pos``, logits, sampling (temperature,
  min-new-tokens EOS masking, top-k, top-p, greedy, or the exponential-race draw ``argmax(p / E)``), and
  the outputs written at column ``step``. On CUDA the step
  is compiled with ``torch.compile`` (Inductor, no own graphs) and captured once per
  ``(batch bucket, sampling flags)`` in a CUDA graph, so a decode step costs one graph launch.
* What is compiled (``compile_scope``): ``"blocks"`` compiles one transformer block, which every layer
  reuses, and the sampler; ``"step"`` compiles the whole step as one graph (unrolled over the layers:
  Inductor can fuse across block boundaries, but tracing and compiling take about as many times longer
  as there are layers, on every cold and warm start); its prefill runs eagerly.
* Batches are padded up to a bucket size; the host checks "all finished?" only every ``check_every``
  steps to avoid a device sync per token.

The static KV cache, the attention function and the per-bucket buffers are in
:mod:`rlhf_kit.generation.static_cache`, the sampling functions in :mod:`rlhf_kit.generation.sampling`;
this module is the backend that drives them.

Supported: the decoder families of :data:`rlhf_kit.tiny.FAMILIES` (llama, mistral, qwen2, gpt2,
gpt_neox). Sequences longer than a model's sliding window are refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
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
from rlhf_kit.generation.decode_step import chain_streams, chains_for, check_chains, decode_step
from rlhf_kit.generation.deferred import defer_residuals
from rlhf_kit.generation.fused import fuse_projections
from rlhf_kit.generation.sampling import _Flags, filter_top_k_top_p, sample_from_scores, sample_into
from rlhf_kit.generation.static_cache import (
    ATTN_IMPLEMENTATION,
    DECODE_ATTENTION,
    _activate,
    _Buffers,
    _default_buckets,
    _KVState,
    _register_attention,
    _sliding_window,
    prefill_inputs,
    resolve_decode_attention,
    static_kv_attention,
)
from rlhf_kit.models.compile import allow_recompiles, compile_blocks, compile_edges, dependent_launch
from rlhf_kit.models.transfer import host_tensor

__all__ = ["ATTN_IMPLEMENTATION", "CompiledBackend", "filter_top_k_top_p", "sample_from_scores"]

logger = logging.getLogger(__name__)

COMPILE_SCOPES = ("blocks", "step")
PREFILL_ALIGN = 16  # compiled prefill: prompt widths rounded up to a multiple of this
MAX_PREFILL_SHAPES = 16  # compiled prefill: distinct (bucket, width) shapes compiled per backend


def _eager() -> Any:
    """Run compiled functions (the compiled blocks and sampler) eagerly inside this context."""
    return torch.compiler.set_stance("force_eager")


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
        compile_options: extra ``torch.compile`` keyword arguments (e.g. ``{"fullgraph": True}``); on Hopper
            and later, Inductor's programmatic dependent launch is on (:func:`~rlhf_kit.models.compile.dependent_launch`).
        compile_scope: ``"blocks"`` (one compiled transformer block shared by all layers, plus the
            compiled sampler) or ``"step"`` (the whole decode step as one graph); see the module docstring.
        decode_attention: the decode step's attention over the cache: ``"triton"`` (one kernel per layer
            that also writes the cache, :mod:`rlhf_kit.generation.decode_kernel`), ``"matmul"`` (2-4% faster
            per step than SDPA on an H200, docs/benchmarks.md) or ``"sdpa"``
            (:func:`~rlhf_kit.generation.static_cache.grouped_decode_attention`); ``"auto"`` is
            ``"triton"`` on CUDA where Triton imports and the head size is a power of two >= 16, else
            ``"matmul"``.
        fuse: stack QKV and gate/up projections of Llama-family blocks (:mod:`rlhf_kit.generation.fused`),
            and move each block's last residual add into the next one's first norm
            (:mod:`rlhf_kit.generation.deferred`).
        compile_prefill: run the prompt through the compiled blocks (``compile_scope="blocks"`` only;
            see the module docstring); ``False`` keeps the prefill eager.
        decode_chains: run each decode step of a bucket of at least ``2 * decode_chains`` rows as this many
            independent row chains, each on its own stream (:mod:`rlhf_kit.generation.decode_step`: slower).
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
        compile_scope: str = "blocks",
        decode_attention: str = "auto",
        fuse: bool = True,
        compile_prefill: bool = True,
        decode_chains: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        for name, val in (("compile", compile), ("cuda_graphs", cuda_graphs)):
            if val not in (True, False, "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {val!r}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        self.compile_scope = compile_scope
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        _register_attention()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.fused_modules = fuse_projections(self.model, static_kv_attention) if fuse else 0
        self.deferred_residuals = fuse and defer_residuals(self.model)
        self.tokenizer = tokenizer
        self.check_every = check_every
        self.compile_prefill = compile_prefill
        self._prefill_shapes: set[tuple[int, int]] = set()
        self.compile_options = dict(compile_options or {})
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        on_cuda = self.device.type == "cuda"
        self.use_compile = on_cuda if compile == "auto" else bool(compile)
        self.use_graphs = on_cuda if cuda_graphs == "auto" else bool(cuda_graphs)
        if self.use_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.decode_attention = resolve_decode_attention(decode_attention, self.device, head_dim)
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
        self._sampler = sample_into  # compiled under compile_scope="blocks"
        self.compiled_edges: list[str] = []  # the final norm and rotary embedding, compiled with the blocks
        self.mode = "eager"  # what the last decode loop ran: eager / compiled / graph / compiled+graph
        self.decode_chains, self._chains = check_chains(decode_chains, compile_scope), {}
        self._streams = chain_streams(decode_chains, self.device)

    # -- memory ---------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Allocate the KV cache and buffers for the largest bucket (otherwise done lazily)."""
        self._ensure_state()
        self._buffers(self.max_batch_size)

    def sleep(self) -> None:
        """Free the KV cache, the static buffers and the captured graphs (weights stay)."""
        self._graphs.clear()
        self._bufs.clear()
        self._chains.clear()  # views of the buffers just dropped
        if self._state is not None:
            self._state.release()
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
            self._state = _KVState(self.max_batch_size, self.max_seq_len, self.device, self.decode_attention)
        return self._state

    def _buffers(self, b: int) -> _Buffers:
        if b not in self._bufs:
            self._bufs[b] = _Buffers(b, self.max_seq_len, self.vocab, self.dtype, self.device)
        return self._bufs[b]

    def _bucket(self, b: int) -> int:
        return next(s for s in self.buckets if s >= b)

    def _decode_step(self, b: int, flags: _Flags) -> None:
        """One token for the whole bucket (:func:`~rlhf_kit.generation.decode_step.decode_step`)."""
        bufs = self._bufs[b]
        chains = chains_for(self._chains, bufs, self._state, self.decode_chains)
        decode_step(self.model, bufs, self._state, flags, self._sampler, chains, self._streams)

    def _step_fn(self) -> Any:
        if not self.use_compile:
            return self._decode_step
        if self._compiled is None:
            allow_recompiles()  # one compilation per (bucket, sampling flags, model class)
            opts = dependent_launch(self.device, {"dynamic": False, **self.compile_options})
            if self.compile_scope == "step":
                self._compiled = torch.compile(self._decode_step, **opts)
            else:  # one block compiled for every layer (its KV buffers are module inputs), and the sampler
                compile_blocks(self.model, **opts)
                self.compiled_edges = compile_edges(self.model, **opts)  # final norm, rotary: once per token
                self._sampler = torch.compile(sample_into, **opts)
                self._compiled = self._decode_step
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
        # The warm-up samples too; restoring the generator afterwards makes a capture draw nothing, so the
        # caller's random stream is the same whether this call captures or replays a kept graph.
        rng = torch.cuda.get_rng_state(self.device)
        with torch.cuda.stream(stream), _activate(state):
            with _eager():  # allocates the KV buffers outside compiled code
                self._decode_step(b, flags)
            for _ in range(3):
                fn(b, flags)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.set_rng_state(rng, self.device)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool), _activate(state):
            fn(b, flags)
        self._graphs[key] = graph
        return graph

    def _prefill_width(self, b: int, p: int, n_new: int) -> tuple[int, bool]:
        """The prefill's width for prompts ``p`` wide in bucket ``b``, and whether it runs compiled."""
        if not (self.use_compile and self.compile_scope == "blocks" and self.compile_prefill):
            return p, False
        width = max(p, min(-(-p // PREFILL_ALIGN) * PREFILL_ALIGN, self.max_seq_len - n_new + 1))
        if (b, width) not in self._prefill_shapes:
            if len(self._prefill_shapes) >= MAX_PREFILL_SHAPES:
                return p, False
            self._prefill_shapes.add((b, width))
        return width, True

    def _prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        bufs: _Buffers,
        flags: _Flags,
        state: _KVState,
        compiled: bool = False,
    ) -> bool:
        """Run the prompt, sample token 0, and set up positions, slot and the decode mask. ``compiled``:
        through the compiled blocks (once the KV buffers exist: they are allocated outside compiled code);
        returns whether it did."""
        p = ids.shape[1]
        neg = torch.finfo(self.dtype).min
        valid = mask.bool()
        prefill_mask, position_ids = prefill_inputs(mask, self.dtype)
        compiled = compiled and bool(state.modules)
        with _activate(state), contextlib.nullcontext() if compiled else _eager():
            out = self.model(
                input_ids=ids,
                position_ids=position_ids,
                attention_mask=prefill_mask,
                use_cache=False,
                logits_to_keep=1,
            )
        bufs.step.zero_()
        sample_into(out.logits[:, -1, :], bufs, flags)
        bufs.step.fill_(1)
        bufs.pos.copy_(mask.long().sum(-1, keepdim=True))
        bufs.mask.fill_(neg)
        bufs.mask[:, 0, 0, :p].masked_fill_(valid, 0.0)
        state.row_start[: ids.shape[0]] = p - valid.sum(-1)  # left padded (check_prompts): the first token
        state.cache_pos.fill_(p)
        return compiled

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
        flags = bufs.set_params(params, eos, pad, self.vocab)
        graph = self._graph_for(b, flags) if self.use_graphs else None
        if params.seed is not None:
            torch.manual_seed(params.seed)
        step_fn = self._step_fn()
        width, compiled_prefill = self._prefill_width(b, p, n_new)
        ids = torch.full((b, width), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((b, width), dtype=torch.long, device=self.device)  # more left padding if wider
        ids[:n_rows, width - p :] = input_ids.to(self.device)
        mask[:n_rows, width - p :] = attention_mask.to(self.device)
        bufs.finished.zero_()
        bufs.finished[n_rows:] = True  # bucket padding rows never block the early exit
        bufs.out_valid.zero_()
        compiled_prefill = self._prefill(ids, mask, bufs, flags, state, compiled_prefill)
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
                        bufs.mark_stopped(self.tokenizer, n_rows, done_steps, params.stop_strings)
                    if bool(bufs.finished.all()):
                        break
        self.mode = ("compiled" if self.use_compile else "eager") + ("+graph" if graph is not None else "")
        valid = bufs.out_valid[:n_rows, :done_steps].clone()
        tokens = bufs.out_tok[:n_rows, :done_steps].clone()
        logp = bufs.out_lp[:n_rows, :done_steps].clone()
        ended = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        if eos:
            is_eos = torch.isin(tokens, host_tensor(list(eos), self.device, torch.long)) & valid
            ended = is_eos.any(1)
        dev, prefill = input_ids.device, "compiled" if compiled_prefill else "eager"
        info = dict(backend="compiled", mode=self.mode, bucket=b, steps=done_steps, prefill=prefill)
        info["prefill_width"] = width
        return finalize(
            input_ids, attention_mask, tokens.to(dev), logp.to(dev), valid.to(dev), ended.to(dev), pad,
            params.stop_strings, self.tokenizer, info=info,
        )  # fmt: skip

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
