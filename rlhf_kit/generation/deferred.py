"""Each block's last residual add moved into the next block's first norm, in a backend's inference copy.

A Llama-family block ends with ``h = h + mlp(norm(h))``. Compiled one block at a time (the compiled
backend's ``compile_scope="blocks"``), that add is a kernel of its own: nothing else in the block reads
its result, and the next block's input norm, which does, is another compiled graph. At a decode batch of
64 it is a launch-bound kernel of about 1.5 us per layer (the profile in docs/benchmarks.md), like the
norm that follows it. Here every block instead returns the pair ``(h, mlp_out)`` and the next block
starts with ``norm(h + mlp_out)``: the add runs inside that norm's kernel, which also writes the sum for
the block's attention residual. The final norm takes the last pair the same way. One kernel per layer
fewer per decode step and per prefill; the sums are the same, rounded once to the model's dtype.

How: the decoder's forward (the module holding ``embed_tokens``, ``layers``, ``norm`` and
``rotary_emb``) runs its own layer loop for the calls the backend makes (token ids, a ready 4D additive
mask, explicit positions, no cache object); any other call goes to the model's own forward, and each
block and the final norm then behave as before (they return the pair only when called with
``pending=``). The whole model's output is checked against its unchanged forward on a random input before
the change is kept, so a block of another shape, or a transformers release that changes these modules,
stays as it was.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from rlhf_kit.generation.static_cache import prefill_inputs
from rlhf_kit.models.compile import decoder_blocks
from rlhf_kit.models.heads import unwrap

logger = logging.getLogger(__name__)

_BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_MARK = "_rlhf_kit_deferred"


def _block_forward(
    self: nn.Module, hidden_states: torch.Tensor, *args: Any, pending: Any = _MARK, **kwargs: Any
) -> Any:
    """A Llama-family block that returns ``(h, mlp_out)`` when called with ``pending`` (the previous
    block's ``mlp_out``; zeros for the first block); without it, the block's own forward."""
    if pending is _MARK:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    h = hidden_states + pending
    attn, _ = self.self_attn(hidden_states=self.input_layernorm(h), **kwargs)
    h = h + attn
    return h, self.mlp(self.post_attention_layernorm(h))


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor, pending: torch.Tensor | None = None) -> Any:
    """The final norm of ``hidden_states + pending`` (the last block's pair)."""
    return type(self).forward(self, hidden_states if pending is None else hidden_states + pending)


def _decoder_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs: Any,
) -> Any:
    """The backend's calls run the loop below; any other call runs the decoder's own forward."""
    if cache is None:  # the forward's deprecated name for it; passed on under both, the new one would win
        cache = kwargs.pop("past_key_values", None)
    own = (
        input_ids is None
        or position_ids is None
        or not isinstance(attention_mask, torch.Tensor)
        or attention_mask.dim() != 4
        or cache is not None
        or inputs_embeds is not None
        or use_cache
        or any(v is not None and v is not False for v in kwargs.values())  # output_hidden_states, ...
    )
    if own:
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
    h = self.embed_tokens(input_ids)
    rotary = self.rotary_emb(h, position_ids)
    pending = torch.zeros_like(h)  # a memset, not a second compiled variant of the block for the first layer
    for block in self.layers[: self.config.num_hidden_layers]:
        h, pending = block(
            h,
            pending=pending,
            attention_mask=attention_mask,
            position_embeddings=rotary,
            position_ids=position_ids,
        )
    return BaseModelOutputWithPast(last_hidden_state=self.norm(h, pending))


def _decoder_of(model: nn.Module) -> nn.Module | None:
    """The module whose ``layers`` are the blocks, if it has the parts the loop uses."""
    try:
        blocks = decoder_blocks(model)
    except ValueError:
        return None
    for module in unwrap(model).modules():
        if getattr(module, "layers", None) is blocks:
            parts = ("embed_tokens", "norm", "rotary_emb", "config")
            return module if all(hasattr(module, p) for p in parts) else None
    return None


def _patched(decoder: nn.Module) -> tuple[nn.Module, ...]:
    """The modules whose ``forward`` the deferral replaces."""
    return (decoder, decoder.norm, *decoder.layers)


def _undo(decoder: nn.Module) -> None:
    for module in _patched(decoder):
        vars(module).pop("forward", None)


def _check(model: nn.Module, decoder: nn.Module) -> bool:
    """Does the model give its unchanged forward's logits (to the weights' dtype's rounding)? Run on two
    left-padded rows of random tokens with the 4D mask and positions the backend passes."""
    p = next(model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=gen).to(p.device)
    mask = torch.ones(2, 6, dtype=torch.long, device=p.device)
    mask[1, :2] = 0
    additive, positions = prefill_inputs(mask, p.dtype)
    kwargs = dict(input_ids=ids, attention_mask=additive, position_ids=positions, use_cache=False)
    with torch.no_grad():
        got = model(**kwargs).logits.float()
        saved = {m: vars(m).pop("forward") for m in _patched(decoder)}
        try:
            want = model(**kwargs).logits.float()
        finally:
            for m, f in saved.items():
                m.forward = f
    tol = 1e-4 if p.dtype == torch.float32 else 3e-2
    scale = want.abs().max().clamp(min=1.0)
    return bool(((got - want).abs().max() / scale) < tol)


def defer_residuals(model: nn.Module) -> bool:
    """Move each block's last residual add of ``model`` (an inference copy) into the next block's first
    norm, in place (see the module docstring); returns whether it did. Only Llama-family blocks (an input
    norm, attention, a post-attention norm and an MLP) whose model passes the output check are changed."""
    decoder = _decoder_of(model)
    if decoder is None or not all(all(hasattr(b, n) for n in _BLOCK_PARTS) for b in decoder.layers):
        return False
    decoder.forward = types.MethodType(_decoder_forward, decoder)
    decoder.norm.forward = types.MethodType(_norm_forward, decoder.norm)
    for block in decoder.layers:
        block.forward = types.MethodType(_block_forward, block)
    try:
        ok = _check(model, decoder)
    except Exception:  # noqa: BLE001 -- a block of another shape: keep the model as it was
        logger.exception("%s: deferred residual adds failed their check run", type(decoder).__name__)
        ok = False
    if not ok:
        logger.warning(
            "%s: deferred residual adds do not match its forward; kept as it was", type(decoder).__name__
        )
        _undo(decoder)
    return ok
