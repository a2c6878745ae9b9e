"""Reference backend: Hugging Face ``model.generate`` (dynamic KV cache, eager kernels: a model whose
blocks were compiled runs them eagerly here).

Slow but the ground truth that :class:`~rlhf_kit.generation.compiled.CompiledBackend` is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from rlhf_kit.generation.base import (
    GenerationOutput,
    SamplingParams,
    Weights,
    check_prompts,
    eos_ids,
    finalize,
    load_weights_,
    pad_id,
    valid_until_eos,
)


@contextlib.contextmanager
def _neutral_generation_config(model: nn.Module, eos: list[int], pad: int) -> Iterator[None]:
    """Swap the model's ``generation_config`` for a blank one for the duration of a ``generate`` call.

    ``generate`` fills every field the call leaves at its default from ``model.generation_config``, so a
    checkpoint's ``repetition_penalty``, ``no_repeat_ngram_size``, ``top_k: 50`` or ``eos_token_id``
    would otherwise reshape the distribution samples are drawn from, and PPO's ratios and KL would be
    computed for a policy that did not sample them. With a blank config only :class:`SamplingParams`
    decides.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft generates with it
    saved = getattr(inner, "generation_config", None)
    inner.generation_config = GenerationConfig(eos_token_id=eos or None, pad_token_id=pad)
    try:
        yield
    finally:
        inner.generation_config = saved


class _ResponseStopStrings(StoppingCriteria):
    """Stop a row once its *response* text contains a stop string.

    HF's own ``stop_strings`` also match across the prompt/response boundary (a prompt ending in
    ``"Assistant:"`` plus a generated ``":"`` matches ``"::"``); RLHF responses must end by their own text,
    the rule :func:`~rlhf_kit.generation.base.find_stop` applies to every backend.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...], prompt_width: int) -> None:
        self.tokenizer, self.stop_strings, self.p = tokenizer, stop_strings, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        rows = input_ids[:, self.p :].tolist()
        hits = [
            any(s in self.tokenizer.decode(r, skip_special_tokens=False) for s in self.stop_strings)
            for r in rows
        ]
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """Generation through ``model.generate``, with the sampler log-probs recovered from its logits.

    Args:
        model: a HF causal LM (``*ForCausalLM``), used as is (weights shared with whoever owns it).
        tokenizer: needed only for ``stop_strings`` (matched on the response text, through the tokenizer's
            ``decode``).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> GenerationOutput:
        """Sample ``params.max_new_tokens`` at most for left-padded ``(b, p)`` prompts."""
        check_prompts(input_ids, attention_mask)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: HFBackend(model, tokenizer=...)")
        config = self.model.config
        eos, pad = eos_ids(params, config), pad_id(params, config)
        kw: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=not params.greedy,
            pad_token_id=pad,
            eos_token_id=eos or None,
            return_dict_in_generate=True,
            output_logits=True,
        )
        if not params.greedy:
            kw.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        extra: dict[str, Any] = {}
        if params.stop_strings:
            stop = _ResponseStopStrings(self.tokenizer, params.stop_strings, input_ids.shape[1])
            extra["stopping_criteria"] = StoppingCriteriaList([stop])
        if params.seed is not None:
            torch.manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            # compiled blocks (--compile-blocks) run eagerly here: under the dynamic cache Dynamo would
            # specialise the block per layer index and per cache length, and the compiled shapes the
            # scoring and training passes need would wait behind dozens of compilations
            with _neutral_generation_config(self.model, eos, pad), torch.compiler.set_stance("force_eager"):
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=GenerationConfig(**kw),
                    **extra,
                )
        finally:
            self.model.train(was_training)
        p = input_ids.shape[1]
        tokens = out.sequences[:, p:]
        logits = torch.stack(out.logits, dim=1)  # (b, n, v), before any logits processor
        logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)
        logp = logp.gather(-1, tokens[..., None]).squeeze(-1)
        valid, ended = valid_until_eos(tokens, eos)
        return finalize(
            input_ids,
            attention_mask,
            tokens,
            logp,
            valid,
            ended,
            pad,
            params.stop_strings,
            self.tokenizer,
            info={"backend": "hf"},
        )

    def update_weights(self, weights: Weights) -> int:
        """Copy weights into the model in place (see :func:`~rlhf_kit.generation.base.load_weights_`)."""
        return load_weights_(self.model, weights)

    def wake(self) -> None:
        """No persistent KV cache: nothing to allocate."""

    def sleep(self) -> None:
        """``generate`` frees its cache on return; only the allocator's cached blocks are released."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
