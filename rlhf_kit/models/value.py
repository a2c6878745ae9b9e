"""Critics: one value per token.

:class:`TokenValueModel` wraps a plain ``AutoModelForSequenceClassification`` (``num_labels=1``) and
applies its score head at every position, so a critic initialised from a reward model is just that
reward model, and a saved critic loads back with plain transformers.

:class:`CausalLMWithValueHead` shares one backbone between the policy's LM head and a scalar value
head, for users who want a single model.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from rlhf_kit.models.heads import per_token_scores, position_ids_from_mask


class TokenValueModel(nn.Module):
    """Per-token values from a sequence-classification model (its ``score`` head at every token).

    Build from a reward model (``TokenValueModel(rm)`` or ``TokenValueModel.from_pretrained(rm_dir)``:
    the RM's score head becomes the value head, as NeMo-Aligner initialises its critic).
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> TokenValueModel:
        return cls(AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        **forward_kwargs,
    ) -> torch.Tensor:
        """Args: ``(b, t)`` ids and mask (left or right padded; None when every row's real tokens come
        first). Returns ``(b, t)`` float32 values. ``forward_kwargs`` go to the backbone."""
        return per_token_scores(self.model, input_ids, attention_mask, position_ids, **forward_kwargs)

    def save_pretrained(self, path: str, **kwargs) -> None:
        """Save as a standard HF sequence-classification directory."""
        self.model.save_pretrained(path, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)


def response_values(
    critic: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    alignment=None,
    packed: bool | str = False,
) -> torch.Tensor:
    """Values aligned with response tokens: entry ``i`` is the value of the state that generates
    response token ``i`` (the hidden state one position earlier), as PPO log-probs are aligned.

    Args:
        sequences, attention_mask: ``(b, p + n)``. Returns ``(b, n)``.

    A :class:`TokenValueModel` runs a left-padded batch of contiguous rows moved to the front, without
    a mask (:mod:`rlhf_kit.models.layout`): the same values, on SDPA's causal path (``alignment``, a
    ``LeftAlignment`` the caller already knows, saves reading the mask). ``packed``: such a batch runs
    padding-free instead, every row's real tokens end to end (:mod:`rlhf_kit.models.varlen`; ``"auto"``:
    where that is exact and fast).
    """
    from rlhf_kit.models.attention import maskless_causal
    from rlhf_kit.models.heads import unwrap
    from rlhf_kit.models.layout import left_alignment
    from rlhf_kit.models.varlen import packed_attention, packing, use_packed

    n = sequences.shape[1] - prompt_length
    if isinstance(unwrap(critic), TokenValueModel):
        la = alignment if alignment is not None else left_alignment(attention_mask)
        if la.contiguous and la.max_shift < prompt_length and use_packed(packed, critic, sequences):
            pk = packing(attention_mask.sum(-1), host=la.lengths)
            ids = pk.pack(la.align(sequences) if la.max_shift else sequences)
            with packed_attention(critic):
                values = critic(ids, None, **pk.forward_kwargs(ids.device))[0]
            values = values[pk.index(la.response_index(prompt_length, n)).to(values.device)]
            return values * attention_mask[:, prompt_length:].to(values)
        if la.contiguous and la.max_shift < prompt_length:  # with no left padding, right padding needs no mask
            with maskless_causal(critic, sequences.shape[1]):  # no mask built, nothing read
                values = critic(la.align(sequences) if la.max_shift else sequences, None)
            values = values.gather(1, la.response_index(prompt_length, n).to(values.device))
            return values * attention_mask[:, prompt_length:].to(values)  # 0 on padding, either layout
    values = critic(sequences, attention_mask)
    return values[:, prompt_length - 1 : -1] * attention_mask[:, prompt_length:].to(values)


class CausalLMWithValueHead(nn.Module):
    """A causal LM plus a linear value head on the last hidden state of the same backbone.

    ``forward`` returns ``(logits (b, t, v), values (b, t))``. Saved as the LM's HF directory plus
    ``value_head.safetensors``.
    """

    VALUE_HEAD_FILE = "value_head.safetensors"

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.v_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.v_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.v_head.bias)
        self.v_head.to(dtype=next(lm.parameters()).dtype)

    @property
    def config(self):
        return self.lm.config

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> CausalLMWithValueHead:
        model = cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))
        head = os.path.join(path, cls.VALUE_HEAD_FILE)
        if os.path.exists(head):
            state = load_file(head)
            model.v_head.load_state_dict({k.removeprefix("v_head."): v for k, v in state.items()})
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        values = self.v_head(out.hidden_states[-1])[..., 0].float()
        return out.logits, values

    def save_pretrained(self, path: str, **kwargs) -> None:
        self.lm.save_pretrained(path, **kwargs)
        state = {f"v_head.{k}": v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()}
        tmp = os.path.join(path, self.VALUE_HEAD_FILE + ".tmp")
        save_file(state, tmp)
        os.replace(tmp, os.path.join(path, self.VALUE_HEAD_FILE))
