"""8-bit AdamW over bf16 weights, one fused update per chunk of many parameters.

With fp32 master weights a trained parameter costs 18 bytes (bf16 weight 2, master 4, fp32 gradient 4,
AdamW moments 8: :mod:`rlhf_kit.training.precision`). Here it costs about 6: the model holds bf16
weights and bf16 gradients, and both moments are kept block-wise quantised to 8 bits (Dettmers et al.,
2022, "8-bit Optimizers via Block-wise Quantization": blocks of 256 values, one fp32 scale each, the
dynamic tree map of codes). Each update is added to the bf16 weight with stochastic rounding (Zamirai
et al., 2020, "Revisiting BFloat16 Training"): a step smaller than the weight's bf16 spacing still lands
in expectation, which rounding to nearest would drop.

:class:`AdamW8bit` is a multi-tensor optimizer. torchao's ``AdamW8bit`` calls one compiled update per
parameter, and its host time (0.4-0.7 ms a parameter, 0.28 s per PPO step on a 1B actor and critic on an
H200: docs/benchmarks.md) was the cost of the switch. Here the parameters of a group are packed
into chunks of up to ``chunk_numel`` values: each chunk's weights, gradients and quantised moments are
gathered into flat buffers (one ``torch.cat`` each), updated by one function (compiled once on CUDA,
the number of blocks symbolic), and written back with ``torch._foreach_copy_``. A parameter larger
than a chunk is split on block boundaries; every parameter starts on a new block, so a block never
mixes two tensors. The quantisation map, the block scaling and de-quantisation are torchao's
(``torchao.optim.quant_utils``, the optional ``[lowbit]`` extra). Rounding to codes reads two tables
built from torchao's rounding function (:mod:`rlhf_kit.training.lowbit_codes`) instead of its 8-step
binary search, and the codes equal torchao's (tested). With the binary search, on an H100 for a
1B-parameter model, the step took 14 ms of host time against torchao's 89 ms, but 0.107 s on the device
against torchao's 0.089 s: the fused kernel was bound by the map's dependent reads (about 22 per value),
not by bytes (docs/benchmarks.md).

State, per parameter: ``step`` (a 0-d CPU tensor, as torch's AdamW), ``exp_avg`` / ``exp_avg_sq`` (uint8
codes, padded to whole blocks) and ``exp_avg_scale`` / ``exp_avg_sq_scale`` (fp32, one per block): about
2.03 bytes per value, plain tensors that ``torch.save``, ``torch.load(weights_only=True)`` and the
offload helpers handle as they are. Resume is exact (the stochastic rounding draws from torch's global
generator, which checkpoints carry).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rlhf_kit.training.lowbit_codes import code_tables, quantize_with_tables, torchao_quant_utils
from rlhf_kit.training.optim import param_groups

_CODES = ("exp_avg", "exp_avg_sq")
_SCALES = ("exp_avg_scale", "exp_avg_sq_scale")


def bf16_stochastic_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` (any shape) to bf16, up or down with probability given by the dropped bits.

    A bf16 keeps the top 16 bits of an fp32; adding a uniform 16-bit integer to the bit pattern before
    truncating carries into the kept bits with probability (dropped bits) / 2^16, so the result is
    unbiased: E[round(x)] = x (Zamirai et al., 2020). Draws from torch's global generator.
    """
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


def adamw8bit_update(
    w: torch.Tensor,
    g: torch.Tensor,
    m_codes: torch.Tensor,
    m_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    signed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    unsigned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    hyper: tuple[torch.Tensor, ...],
    stochastic: bool,
) -> tuple[torch.Tensor, ...]:
    """One AdamW step (Loshchilov & Hutter, 2019) on flat buffers with 8-bit block-wise moments.

    Shapes: ``w``, ``g``, ``m_codes``, ``v_codes`` (n_blocks, block); ``m_scale``, ``v_scale``
    (n_blocks,); ``signed`` and ``unsigned`` are each a map's ``(qmap (256,) code values, table, bounds)``
    (:func:`rlhf_kit.training.lowbit_codes.code_tables`). ``hyper`` holds 0-d tensors: decay
    (1 - lr * weight_decay), step size (lr / bias correction 1), sqrt of bias correction 2, 1 - beta1,
    1 - beta2, eps. Returns the new ``(w, m_codes, m_scale, v_codes, v_scale)``; ``w`` in its own dtype,
    rounded stochastically from fp32 when ``stochastic``.
    """
    qu = torchao_quant_utils()
    decay, step_size, bc2_sqrt, one_minus_b1, one_minus_b2, eps = hyper
    g32 = g.float()
    m = qu.dequant_with_qmap(m_codes, signed[0], m_scale).lerp(g32, one_minus_b1)
    v = qu.dequant_with_qmap(v_codes, unsigned[0], v_scale).lerp(g32 * g32, one_minus_b2)
    new = w.float() * decay - step_size * m / (v.sqrt() / bc2_sqrt + eps)
    block = m_codes.shape[-1]
    m, m_scale = qu.scale_tensor(m, block)
    v, v_scale = qu.scale_tensor(v, block)
    m_codes, v_codes = quantize_with_tables(m, *signed[1:]), quantize_with_tables(v, *unsigned[1:])
    new = bf16_stochastic_round(new) if stochastic else new.to(w.dtype)
    return new, m_codes, m_scale, v_codes, v_scale


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise moments, updating many parameters per call (see the module docstring).

    ``params`` are floating-point tensors (bf16 ones are rounded stochastically unless
    ``stochastic_round=False``, which rounds to nearest as torchao does with it off); ``block_size`` values
    share one scale; ``chunk_numel`` (a multiple of ``block_size``) bounds the values updated per call and
    so the transient memory; ``compile`` (default: when the parameters are on CUDA) runs the update
    through ``torch.compile`` once, with a symbolic number of blocks. Learning rates stay plain floats,
    so schedulers and logging see what they see with torch's AdamW.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        block_size: int = 256,
        chunk_numel: int = 1 << 26,
        compile: bool | None = None,
        stochastic_round: bool = True,
    ) -> None:
        if block_size <= 0 or chunk_numel <= 0 or chunk_numel % block_size:
            raise ValueError(
                f"chunk_numel ({chunk_numel}) must be a positive multiple of block_size ({block_size})"
            )
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or lr < 0 or eps < 0:
            raise ValueError(f"AdamW8bit: invalid lr {lr}, betas {betas} or eps {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.block_size, self.chunk_numel, self.compile = block_size, chunk_numel, compile
        self.stochastic_round = stochastic_round
        self._qmaps: dict[torch.device, tuple[tuple[torch.Tensor, ...], ...]] = {}
        self._compiled = None

    def _qmap(self, device: torch.device) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The signed and the unsigned map on ``device``, each ``(qmap, table, bounds)``."""
        if device not in self._qmaps:
            qu = torchao_quant_utils()
            maps = []
            for signed in (True, False):
                qmap = torch.tensor(qu.create_dynamic_map(signed), dtype=torch.float32, device=device)
                maps.append((qmap, *code_tables(qmap)))
            self._qmaps[device] = tuple(maps)
        return self._qmaps[device]

    def _update_fn(self, device: torch.device):
        if not (self.compile if self.compile is not None else device.type == "cuda"):
            return adamw8bit_update
        if self._compiled is None:
            compiled = torch.compile(adamw8bit_update)

            def call(*args):  # the number of blocks varies between chunks; the block size does not
                for t in args[:6]:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                return compiled(*args)

            self._compiled = call
        return self._compiled

    def _padded(self, n: int) -> int:
        """``n`` values rounded up to whole blocks."""
        return -(-n // self.block_size) * self.block_size

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        padded = self._padded(p.numel())
        state["step"] = torch.tensor(0.0)
        for codes, scale in zip(_CODES, _SCALES):
            state[codes] = torch.zeros(padded, dtype=torch.uint8, device=p.device)
            state[scale] = torch.zeros(padded // self.block_size, dtype=torch.float32, device=p.device)

    def _chunks(self) -> list[tuple[dict, float, list[tuple[torch.Tensor, int, int]]]]:
        """Steps every state counter once and packs the parameters with gradients into chunks.

        A chunk is ``(group, step, pieces)``; a piece ``(param, start, end)`` is a block-aligned range of
        the flattened parameter. One chunk holds one group, step count, device and dtype pair."""
        chunks, c = [], self.chunk_numel
        for group in self.param_groups:
            open_chunks: dict[tuple, list] = {}  # (step, device, dtypes) -> [pieces, padded size]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                key = (float(state["step"]), p.device, p.dtype, p.grad.dtype)
                for start in range(0, p.numel(), c):
                    end = min(start + c, p.numel())
                    size = self._padded(end - start)
                    entry = open_chunks.get(key)
                    if entry is None or entry[1] + size > c:
                        entry = open_chunks[key] = [[], 0]
                        chunks.append((group, key[0], entry[0]))
                    entry[0].append((p, start, end))
                    entry[1] += size
        return chunks

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, step, pieces in self._chunks():
            self._update_chunk(group, step, pieces)
        return loss

    def _update_chunk(self, group: dict, step: float, pieces: list[tuple[torch.Tensor, int, int]]) -> None:
        b, (beta1, beta2) = self.block_size, group["betas"]
        lr, device = group["lr"], pieces[0][0].device
        hyper = tuple(
            torch.tensor(float(x))  # 0-d CPU tensors: a new lr or step needs no recompilation
            for x in (
                1.0 - lr * group["weight_decay"],
                lr / (1.0 - beta1**step),
                (1.0 - beta2**step) ** 0.5,
                1.0 - beta1,
                1.0 - beta2,
                group["eps"],
            )
        )
        weights, grads, sizes = [], [], []
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in _CODES + _SCALES}  # views of the state
        for p, start, end in pieces:
            state, pad = self.state[p], self._padded(end - start) - (end - start)
            w, g = p.detach().view(-1)[start:end], p.grad.reshape(-1)[start:end]
            if pad:  # the last piece of a parameter whose size is not a whole number of blocks
                w, g = nn.functional.pad(w, (0, pad)), nn.functional.pad(g, (0, pad))
            weights.append(w)
            grads.append(g)
            sizes.append(end - start)
            for k in _CODES:
                parts[k].append(state[k][start : end + pad])
            for k in _SCALES:
                parts[k].append(state[k][start // b : (end + pad) // b])
        flat = {k: _cat(v) for k, v in parts.items()}
        blocks = {k: flat[k].view(-1, b) for k in _CODES}
        signed, unsigned = self._qmap(device)
        w_new, m_codes, m_scale, v_codes, v_scale = self._update_fn(device)(
            _cat(weights).view(-1, b), _cat(grads).view(-1, b),
            blocks["exp_avg"], flat["exp_avg_scale"], blocks["exp_avg_sq"], flat["exp_avg_sq_scale"],
            signed, unsigned, hyper, self.stochastic_round and pieces[0][0].dtype == torch.bfloat16,
        )  # fmt: skip
        w_new, m_codes, v_codes = w_new.view(-1), m_codes.view(-1), v_codes.view(-1)
        padded = [t.numel() for t in parts["exp_avg"]]
        torch._foreach_copy_([p.view(-1)[s:e] for p, s, e in pieces], _split(w_new, padded, sizes))
        for k, new in (("exp_avg", m_codes), ("exp_avg_sq", v_codes)):
            torch._foreach_copy_(parts[k], list(new.split(padded)))
        for k, new in (("exp_avg_scale", m_scale), ("exp_avg_sq_scale", v_scale)):
            torch._foreach_copy_(parts[k], list(new.split([n // b for n in padded])))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that the codes and scales keep their dtypes (torch casts every state
        tensor to its parameter's dtype, which would turn uint8 codes and fp32 scales into bf16)."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for k in _CODES + _SCALES:
                if k in saved:
                    self.state[p][k] = saved[k].to(p.device, copy=True)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """One flat buffer of ``parts`` (the part itself, no copy, when there is one)."""
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _split(flat: torch.Tensor, padded: list[int], sizes: list[int]) -> list[torch.Tensor]:
    """The pieces of ``flat`` laid out at ``padded`` sizes, each cut to its real size."""
    return [part[:n] for part, n in zip(flat.split(padded), sizes)]


def build_8bit_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **kwargs,
) -> AdamW8bit:
    """Cast ``model``'s trainable parameters to bf16 and return an :class:`AdamW8bit` over them.

    Same parameter groups as :func:`rlhf_kit.training.optim.build_optimizer` (no decay on biases and
    norms); updates land with stochastic rounding. Frozen parameters and buffers keep their dtype. Clip
    gradients on ``model`` itself: they live on its parameters. ``kwargs`` go to :class:`AdamW8bit`.
    """
    torchao_quant_utils()  # torchao missing: the one-line error, before any state exists
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("build_8bit_optimizer: no trainable parameters")
    for g in groups:
        for p in g["params"]:
            p.data = p.data.to(torch.bfloat16)
    return AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
