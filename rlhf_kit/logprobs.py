"""Per-token log-probabilities and entropy from logits, chunked to bound float32 memory.

A full float32 ``log_softmax`` of ``(b, t, vocab)`` logits costs ``4 * b * t * vocab`` bytes (2 GiB
for 64 x 256 tokens of a 32k vocabulary). These functions process ``chunk_size`` rows of the
flattened ``(b * t, vocab)`` view at a time, so the float32 working set is ``chunk_size * vocab``.
On CUDA (:data:`FUSED`) they run compiled over all rows instead: fused reductions that read the logits
in their own dtype and hold no float32 copy of them, forward or backward.

Temperature: PPO must score tokens with the same distribution they were sampled from, so logits are
divided by the sampling temperature before the softmax (Huang et al., "The N Implementation Details
of RLHF with PPO", 2023).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEFAULT_CHUNK = 1024

#: Whether these reductions run as one compiled function over all rows (``torch.compile``: the log-sum-exp,
#: the label's logit and the entropy in fused passes over the logits, and one fused backward) instead of
#: the chunked float32 loop. None: where the logits are on CUDA and Triton is present.
FUSED: bool | None = None
_COMPILED: dict[str, object] = {}


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _token_stats(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logits (N, v)``, ``labels (N,)`` -> float32 ``(N,)`` log-probs of the labels under
    ``softmax(logits / temperature)`` and, ``with_entropy``, the entropies (else None). Written for
    ``torch.compile``: eager, it holds float32 copies of the whole ``(N, v)`` block."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, labels[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return lp, None
    return lp, lse - (torch.softmax(z, dim=-1) * z).sum(-1)


def _fused(logits: torch.Tensor):
    """The compiled :func:`_token_stats` where :data:`FUSED` says so for ``logits``, else None."""
    on = FUSED
    if on is None:
        from torch.utils._triton import has_triton

        on = logits.is_cuda and has_triton()
    if not on:
        return None
    fn = _COMPILED.get("token_stats")
    if fn is None:
        fn = _COMPILED["token_stats"] = torch.compile(_token_stats)
    return fn


def _fused_stats(fn, logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool):
    """``fn`` over the flattened ``(b * t, v)`` logits; the row count is symbolic (one graph for every
    batch), the vocabulary a constant."""
    b, t, v = logits.shape
    flat, flat_labels = logits.reshape(b * t, v), labels.reshape(b * t)
    for x in (flat, flat_labels):
        torch._dynamo.maybe_mark_dynamic(x, 0)
    lp, ent = fn(flat, flat_labels, float(temperature), with_entropy)
    return lp.reshape(b, t), (ent.reshape(b, t) if ent is not None else None)


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Args:
        logits: ``(b, t, v)`` any float dtype; position ``i`` scores ``labels[:, i]``.
        labels: ``(b, t)`` token ids.
        temperature: the sampling temperature (> 0).
        chunk_size: rows of the flattened ``(b * t, v)`` logits converted to float32 at once.

    Returns:
        ``(b, t)`` float32 log-probabilities. Differentiable with respect to ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, v = logits.shape
    fn = _fused(logits) if b * t else None
    if fn is not None:
        return _fused_stats(fn, logits, labels, temperature, False)[0]
    flat = logits.reshape(b * t, v)
    flat_labels = labels.reshape(b * t)
    out = []
    for s, e in _chunks(b * t, chunk_size):
        rows = flat[s:e].float()
        if temperature != 1.0:
            rows = rows / temperature
        picked = rows.gather(-1, flat_labels[s:e, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    if not out:
        return logits.new_zeros((b, t), dtype=torch.float32)
    return torch.cat(out).reshape(b, t)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position.

    Args:
        logits: ``(b, t, v)``.

    Returns:
        ``(b, t)`` float32 entropies, ``logsumexp(z) - sum(p * z)`` with ``z = logits / T``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)
    out = []
    for s, e in _chunks(b * t, chunk_size):
        z = flat[s:e].float()
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        out.append(lse - (p * z).sum(-1))
    if not out:
        return logits.new_zeros((b, t), dtype=torch.float32)
    return torch.cat(out).reshape(b, t)


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both :func:`logprobs_from_logits` and :func:`entropy_from_logits` in one pass over the chunks.

    Returns ``((b, t) logprobs, (b, t) entropy)``, float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, v = logits.shape
    fn = _fused(logits) if b * t else None
    if fn is not None:
        return _fused_stats(fn, logits, labels, temperature, True)
    flat = logits.reshape(b * t, v)
    flat_labels = labels.reshape(b * t)
    lps, ents = [], []
    for s, e in _chunks(b * t, chunk_size):
        z = flat[s:e].float()
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)
        logp = z - lse[:, None]
        lps.append(logp.gather(-1, flat_labels[s:e, None]).squeeze(-1))
        ents.append(-(logp.exp() * logp).sum(-1))
    if not lps:
        zero = logits.new_zeros((b, t), dtype=torch.float32)
        return zero, zero.clone()
    return torch.cat(lps).reshape(b, t), torch.cat(ents).reshape(b, t)


def _gather_columns(x: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """``x (b, w, h)``, the last ``w`` of ``width`` columns, at the columns ``index (b, n)`` of the full
    width: ``(b, n, h)``."""
    cols = (index - (width - x.shape[1])).to(x.device)
    return x.gather(1, cols[..., None].expand(*index.shape, x.shape[-1]))


@contextlib.contextmanager
def _head_reads(model: torch.nn.Module, index: torch.Tensor, width: int) -> Iterator[None]:
    """While active, the model's output embeddings (its LM head) see only the hidden states at columns
    ``index (b, n)`` of each row (of ``width`` columns; the model may pass the head only the last ones),
    so the logits are ``(b, n, vocab)``. A model without output embeddings is left alone."""
    from rlhf_kit.models.heads import unwrap

    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def gather(_module: torch.nn.Module, args: tuple) -> tuple:
        return (_gather_columns(args[0], index, width), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _packed_response_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, la, response_start: int
) -> torch.Tensor:
    """``(b, n, vocab)`` logits predicting the response tokens, from one packed forward (every row's real
    tokens end to end; :mod:`rlhf_kit.models.varlen`). Only those ``b * n`` positions reach the LM head."""
    from rlhf_kit.models.varlen import packed_attention, packing

    b, t = input_ids.shape
    n = t - response_start
    pk = packing(attention_mask.sum(-1), host=la.lengths)
    ids = pk.pack(la.align(input_ids) if la.max_shift else input_ids)
    index = pk.index(la.response_index(response_start, n)).reshape(1, b * n)
    with packed_attention(model), _head_reads(model, index, pk.total):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=0, **pk.forward_kwargs(ids.device))
    logits = out.logits
    if logits.shape[1] != b * n:  # no output embeddings to hook: every position was projected
        logits = _gather_columns(logits, index, pk.total)
    return logits.reshape(b, n, -1)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    alignment=None,
    packed: bool | str = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens of ``(prompt + response)`` sequences under a causal LM.

    Args:
        input_ids: ``(b, p + n)`` left-padded prompts of width ``p = response_start`` followed by ``n``
            response tokens (right-padded after EOS).
        attention_mask: ``(b, p + n)``; position ids are derived from it so left padding is harmless.

    Returns:
        ``(b, n)`` float32 log-probs of ``input_ids[:, p:]`` (and ``(b, n)`` entropies when
        ``with_entropy``), 0 where ``attention_mask`` marks response padding. Only the ``n`` positions
        that predict response tokens go through the LM head where the model supports ``logits_to_keep``.

    A left-padded batch whose rows' real tokens are contiguous (prompt then response) runs with each
    row moved to the front and no attention mask (:mod:`rlhf_kit.models.layout`): the same log-probs,
    with SDPA on its causal path. Each row's response then starts in another column, so a forward
    pre-hook on the output embeddings gathers those ``n`` hidden states per row before the LM head
    (whatever the model does after the head, such as logit soft-capping, still runs).
    ``alignment`` (a ``LeftAlignment``) saves the read of the mask that finds the padding when the
    caller knows it. ``packed``: such a batch runs padding-free instead, its rows' real tokens end to end
    in one sequence under variable-length attention (:mod:`rlhf_kit.models.varlen`); the same log-probs.
    ``"auto"`` packs where that is exact and fast (:func:`~rlhf_kit.models.varlen.use_packed`).
    """
    from rlhf_kit.models.attention import maskless_causal
    from rlhf_kit.models.heads import position_ids_from_mask
    from rlhf_kit.models.layout import left_alignment
    from rlhf_kit.models.varlen import use_packed

    n = input_ids.shape[1] - response_start
    labels = input_ids[:, response_start:]
    la = alignment if alignment is not None else left_alignment(attention_mask)
    if la.contiguous and la.max_shift < response_start and use_packed(packed, model, input_ids):
        logits = _packed_response_logits(model, input_ids, attention_mask, la, response_start)
    elif la.contiguous and la.max_shift < response_start:  # no left padding too: right padding needs no mask
        b, t = input_ids.shape
        keep = n + 1 + la.max_shift  # from column p - 1 - max_shift: every row's first response logit
        index = la.response_index(response_start, n)  # (b, n) aligned columns that predict the response
        with _head_reads(model, index, t), maskless_causal(model, t):  # no mask built, nothing read
            out = model(
                input_ids=la.align(input_ids) if la.max_shift else input_ids,
                position_ids=torch.arange(t, device=input_ids.device).expand(b, t),
                use_cache=False,
                logits_to_keep=keep,
            )
        logits = out.logits
        if logits.shape[1] != n:  # no output embeddings to hook: every kept position was projected
            logits = _gather_columns(logits, index, t)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=n + 1,
        )
        logits = out.logits[:, -(n + 1) : -1]
    # padding after a response is 0 (what it would hold depends on the layout, so it is not kept)
    real = attention_mask[:, response_start:].to(device=logits.device, dtype=torch.float32)
    if with_entropy:
        lp, ent = logprobs_and_entropy(logits, labels, temperature, chunk_size)
        return lp * real, ent * real
    return logprobs_from_logits(logits, labels, temperature, chunk_size) * real
