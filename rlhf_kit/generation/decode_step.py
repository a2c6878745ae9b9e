"""One decode step of :class:`~rlhf_kit.generation.compiled.CompiledBackend`, optionally as independent row
chains on their own CUDA streams.

At a decode batch of 64 a small model's step is a chain of short kernels, each bound by its fixed cost
(launch, ramp-up, a few CTAs on a 132-SM card) rather than by the bytes it reads (docs/benchmarks.md):
most of the card idles. With ``chains=2`` the bucket's rows are split in two halves, each half runs the
whole model and the sampler on its own stream, and the two streams join before the shared counters
advance, meant to let two independent chains of kernels fill each other's gaps. Measured, they do not:
each chain streams every weight again, and on an H100 generation was 2% (config A) and 20% (1B) slower
(docs/benchmarks.md, session 29), so the backend runs one chain by default. Captured in a CUDA graph, the
step becomes a fork and a join with two branches. Every row's computation is the same as in one chain
(each row only ever reads its own cache rows and logits), so greedy tokens are the same; sampled tokens
draw other random numbers (two sampler calls instead of one).

A half sees its rows through views: :class:`RowBuffers` (rows ``lo:hi`` of the bucket's static buffers,
the scalar settings shared) and :class:`RowState` (rows ``lo:`` of every layer's KV cache and of the
row starts; the write slot shared). On a CPU the halves run one after the other.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from rlhf_kit.generation.sampling import _Flags
from rlhf_kit.generation.static_cache import _activate, _Buffers, _KVState

_ROW_FIELDS = ("tok", "pos", "mask", "finished", "out_tok", "out_lp", "out_valid")


class RowBuffers:
    """Rows ``lo:hi`` of a bucket's :class:`~rlhf_kit.generation.static_cache._Buffers` (views: writes land in
    the bucket's tensors); the step counter and the sampling settings are the bucket's own tensors."""

    def __init__(self, bufs: _Buffers, lo: int, hi: int) -> None:
        for name, value in vars(bufs).items():
            setattr(self, name, value[lo:hi] if name in _ROW_FIELDS else value)
        self.b = hi - lo


class RowState:
    """Rows ``lo:`` of a :class:`~rlhf_kit.generation.static_cache._KVState`: each layer's key and value
    cache and the row starts as views; the write slot and the attention choice are the state's own."""

    def __init__(self, state: _KVState, lo: int) -> None:
        self.state, self.lo = state, lo
        self.decode_attention = state.decode_attention
        self.cache_pos = state.cache_pos
        self.row_start = state.row_start[lo:]
        self.modules = state.modules

    def buffers(self, module: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.state.buffers(module, like)
        return k[self.lo :], v[self.lo :]


def row_chains(bufs: _Buffers, state: _KVState, chains: int) -> list[tuple[RowBuffers, RowState]]:
    """``chains`` consecutive row ranges of the bucket (sizes differing by at most one row)."""
    if not 1 <= chains <= bufs.b:
        raise ValueError(f"decode chains must be between 1 and the bucket's {bufs.b} rows, got {chains}")
    edges = [round(i * bufs.b / chains) for i in range(chains + 1)]
    return [(RowBuffers(bufs, lo, hi), RowState(state, lo)) for lo, hi in zip(edges, edges[1:])]


def check_chains(chains: int, compile_scope: str) -> int:
    """``chains`` if the backend can run it (at least 1; only 1 when the whole step is one compiled graph)."""
    if chains < 1 or (chains > 1 and compile_scope == "step"):
        raise ValueError(f"decode_chains must be >= 1 (1 under compile_scope='step'), got {chains}")
    return chains


def chain_streams(chains: int, device: torch.device) -> list[Any] | None:
    """One CUDA stream per chain (None on a CPU or for one chain)."""
    return (
        [torch.cuda.Stream(device) for _ in range(chains)] if device.type == "cuda" and chains > 1 else None
    )


def chains_for(
    cache: dict[int, Any], bufs: _Buffers, state: _KVState, chains: int
) -> list[tuple[RowBuffers, RowState]] | None:
    """The bucket's row chains (kept in ``cache`` by bucket size), or None where it runs as one: one chain
    asked for, or fewer than two rows per chain."""
    if chains < 2 or bufs.b < 2 * chains:
        return None
    if bufs.b not in cache:
        cache[bufs.b] = row_chains(bufs, state, chains)
    return cache[bufs.b]


def decode_step(
    model: nn.Module,
    bufs: _Buffers,
    state: _KVState,
    flags: _Flags,
    sampler: Any,
    chains: list[tuple[Any, Any]] | None = None,
    streams: list[Any] | None = None,
) -> None:
    """One token for every row of the bucket; reads and writes only static tensors (graph-capturable).

    ``chains`` (from :func:`row_chains`): run each row range as its own model call, on ``streams[i]`` when
    given (CUDA), joined before the write slot, positions and step advance. None: one call for the bucket.
    """
    bufs.mask.index_fill_(-1, state.cache_pos, 0.0)  # the slot written this step becomes visible
    if not chains:
        out = model(input_ids=bufs.tok, position_ids=bufs.pos, attention_mask=bufs.mask, use_cache=False)
        sampler(out.logits[:, -1, :], bufs, flags)
    else:
        main = torch.cuda.current_stream(bufs.tok.device) if streams else None
        for i, (rows, rows_state) in enumerate(chains):
            stream = streams[i] if streams else None
            if stream is not None:
                stream.wait_stream(main)
            with (
                torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(),
                _activate(rows_state),
            ):
                out = model(
                    input_ids=rows.tok, position_ids=rows.pos, attention_mask=rows.mask, use_cache=False
                )
                sampler(out.logits[:, -1, :], rows, flags)
        for stream in streams or ():
            main.wait_stream(stream)
    bufs.pos.add_(1)
    bufs.step.add_(1)
    state.cache_pos.add_(1)
