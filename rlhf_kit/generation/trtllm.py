"""TensorRT-LLM backend (optional ``trtllm`` extra), written against its documented Python LLM API.

Two ways weights reach TensorRT-LLM, both fed by :mod:`rlhf_kit.generation.resharding`:

* **LLM API, PyTorch backend (what** :class:`TRTLLMBackend` **uses).** ``tensorrt_llm.LLM`` with
  ``orchestrator_type="ray"`` and ``ray_worker_extension_cls="tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"``
  exposes ``update_weights`` on every worker through ``LLM._collective_rpc``. Each step the trainer
  streams full HF-named tensors bucket by bucket (:func:`~rlhf_kit.generation.resharding.iter_full_params`:
  FSDP2 gathered, LoRA merged), shares each bucket with the workers as CUDA IPC handles
  (``torch.multiprocessing.reductions.reduce_tensor``, keyed by device UUID), and finishes with
  ``update_weights(None)`` (post-load processing, prefix-cache reset). The workers load HF names and take
  their own tensor-parallel slice, so training stays FSDP while inference runs ``tensor_parallel_size``-way.
  ``sleep()`` / ``wake()`` call the workers' ``sleep`` / ``wakeup`` with memory tags (``enable_sleep=True``).
* **TensorRT engine checkpoints.** :func:`write_trtllm_checkpoint` writes ``config.json`` plus one
  ``rank{r}.safetensors`` per TP rank with TensorRT-LLM's Llama names and the column / row / fused-QKV /
  vocab splits of :func:`~rlhf_kit.generation.resharding.reshard_for_tp` (input for ``trtllm-build`` or
  an engine refit).

Not run here: TensorRT-LLM cannot be installed on our machines, so nothing in :class:`TRTLLMBackend`
beyond the import guard has executed; ``write_trtllm_checkpoint`` is tested on CPU. See docs/generation.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from rlhf_kit.generation.base import (
    GenerationOutput,
    SamplingParams,
    Weights,
    _iter_weights,
    check_prompts,
    eos_ids,
    finalize,
    pad_id,
)
from rlhf_kit.generation.resharding import ENGINE_FAMILIES, iter_full_params, reshard_for_tp

INSTALL_HINT = (
    "TensorRT-LLM is not installed. Install the optional extra: pip install rlhf-kit[trtllm] "
    "(NVIDIA's tensorrt-llm wheel; needs a CUDA machine and, for multi-GPU, ray)."
)
#: Memory tags released by ``sleep()`` and restored by ``wake()`` (TensorRT-LLM ExecutorMemoryType values).
DEFAULT_SLEEP_TAGS = ("kv_cache",)
_WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"


def _import_trtllm() -> Any:
    try:
        import tensorrt_llm  # noqa: F401
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
        from tensorrt_llm.llmapi import SamplingParams as TRTSamplingParams
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return LLM, KvCacheConfig, TRTSamplingParams


class TRTLLMBackend:
    """Rollouts on TensorRT-LLM (PyTorch backend of the LLM API) with per-step in-place weight refit.

    Args:
        model_dir: HF checkpoint directory of the policy (config, tokenizer files, weights); with
            ``load_format="dummy"`` in ``llm_kwargs`` only the config is read and the first
            :meth:`update_weights` provides the weights.
        tensor_parallel_size: inference TP degree (independent of the trainer's FSDP layout).
        max_batch_size, max_seq_len: engine limits.
        kv_cache_fraction: share of free GPU memory the KV cache may take (colocated with training: small).
        sleep_tags: memory released by :meth:`sleep` (``"kv_cache"``; add ``"model"`` to drop weights too).
        tokenizer: for ``stop_strings`` post-processing (TensorRT-LLM also stops on them itself).
        llm_kwargs: passed to ``tensorrt_llm.LLM`` unchanged.

    Raises:
        ImportError: without the ``tensorrt_llm`` package, with the install hint.
    """

    def __init__(
        self,
        model_dir: str,
        tensor_parallel_size: int = 1,
        max_batch_size: int = 64,
        max_seq_len: int = 2048,
        kv_cache_fraction: float = 0.3,
        dtype: str = "bfloat16",
        sleep_tags: tuple[str, ...] = DEFAULT_SLEEP_TAGS,
        tokenizer: Any = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        llm_cls, kv_cache_config, self._sampling_cls = _import_trtllm()
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = tokenizer
        self.sleep_tags = list(sleep_tags)
        kw: dict[str, Any] = dict(
            backend="pytorch",
            orchestrator_type="ray",
            ray_worker_extension_cls=_WORKER_EXTENSION,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            kv_cache_config=kv_cache_config(
                free_gpu_memory_fraction=kv_cache_fraction, enable_block_reuse=False
            ),
            enable_sleep=True,
        )
        kw.update(llm_kwargs or {})
        self.llm = llm_cls(model=model_dir, **kw)
        self._asleep = False

    # -- generation -----------------------------------------------------------------------------------

    def _sampling(self, params: SamplingParams, eos: list[int], pad: int) -> Any:
        return self._sampling_cls(
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens or None,
            temperature=params.temperature,
            top_k=1 if params.greedy else (params.top_k or None),
            top_p=None if params.greedy or params.top_p >= 1.0 else params.top_p,
            end_id=eos[0] if eos else -1,
            stop_token_ids=eos[1:] or None,
            pad_id=pad,
            ignore_eos=params.ignore_eos,
            stop=list(params.stop_strings) or None,
            include_stop_str_in_output=True,
            detokenize=bool(params.stop_strings),
            logprobs=1,
            seed=params.seed,
        )

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> GenerationOutput:
        """Left-padded ``(b, p)`` prompts -> :class:`GenerationOutput`. ``logprobs`` are what TensorRT-LLM
        reports for the sampled tokens (recompute with ``sequence_logprobs`` where exactness matters)."""
        check_prompts(input_ids, attention_mask)
        if self._asleep:
            self.wake()
        eos, pad = eos_ids(params, self.config), pad_id(params, self.config)
        prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]
        outs = self.llm.generate(prompts, sampling_params=self._sampling(params, eos, pad), use_tqdm=False)
        b, n = len(prompts), params.max_new_tokens
        tokens = torch.full((b, n), pad, dtype=torch.long)
        logp = torch.zeros((b, n), dtype=torch.float32)
        valid = torch.zeros((b, n), dtype=torch.bool)
        finished = torch.zeros(b, dtype=torch.bool)
        for i, out in enumerate(outs):
            comp = out.outputs[0]
            ids = list(comp.token_ids)[:n]
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            valid[i, : len(ids)] = True
            for j, entry in enumerate((comp.logprobs or [])[: len(ids)]):
                logp[i, j] = float(entry[ids[j]].logprob) if isinstance(entry, dict) else float(entry)
            finished[i] = getattr(comp, "finish_reason", None) == "stop"
        dev = input_ids.device
        return finalize(
            input_ids,
            attention_mask,
            tokens.to(dev),
            logp.to(dev),
            valid.to(dev),
            finished.to(dev),
            pad,
            params.stop_strings,
            self.tokenizer,
            info={"backend": "trtllm"},
        )

    # -- weights and memory ---------------------------------------------------------------------------

    def update_weights(self, weights: Weights, bucket_bytes: int = 512 << 20) -> int:
        """Refit the engine in place: stream HF-named full tensors bucket by bucket as CUDA IPC handles.

        ``weights`` may be the (FSDP2 / peft) training model -- gathered and LoRA-merged on the fly by
        :func:`iter_full_params` -- a state dict, or an iterable of ``(hf_name, tensor)``. Tensors must
        live on this process's GPU (the one colocated with the worker that maps them).
        """
        from tensorrt_llm._torch.utils import get_device_uuid
        from torch.multiprocessing.reductions import reduce_tensor

        stream = (
            iter_full_params(weights, bucket_bytes)
            if isinstance(weights, nn.Module)
            else _iter_weights(weights)
        )
        uuid = get_device_uuid(torch.cuda.current_device())
        bucket: list[tuple[str, torch.Tensor]] = []
        size = count = 0

        def send() -> None:
            handles = [(name, reduce_tensor(t)) for name, t in bucket]
            self.llm._collective_rpc("update_weights", args=({uuid: handles},))

        for name, tensor in stream:
            t = tensor.detach().to(device="cuda", non_blocking=True).contiguous()
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            count += 1
            if size >= bucket_bytes:
                torch.cuda.synchronize()
                send()
                bucket, size = [], 0
        if bucket:
            torch.cuda.synchronize()
            send()
        self.llm._collective_rpc("update_weights", args=(None,))  # finalize: post-load hooks, cache reset
        return count

    def sleep(self) -> None:
        """Release ``sleep_tags`` memory (KV cache by default) on every worker."""
        self.llm._collective_rpc("sleep", args=(self.sleep_tags,))
        self._asleep = True

    def wake(self) -> None:
        """Re-materialise the memory released by :meth:`sleep`."""
        self.llm._collective_rpc("wakeup", args=(self.sleep_tags,))
        self._asleep = False

    def shutdown(self) -> None:
        self.llm.shutdown()


# ----------------------------------------------------------------------------------------------------
# TensorRT engine checkpoints (tested on CPU: needs no tensorrt_llm)


def trtllm_checkpoint_config(config: Any, tp_size: int, dtype: str) -> dict[str, Any]:
    """``config.json`` of a TensorRT-LLM Llama-family checkpoint from a HF config."""
    heads = int(config.num_attention_heads)
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": int(config.vocab_size),
        "max_position_embeddings": int(config.max_position_embeddings),
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_size": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "hidden_act": str(config.hidden_act),
        "intermediate_size": int(config.intermediate_size),
        "norm_epsilon": float(config.rms_norm_eps),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": float(getattr(config, "rope_theta", None) or 10000.0),
        "use_parallel_embedding": tp_size > 1,
        "embedding_sharding_dim": 0,
        "share_embedding_table": bool(getattr(config, "tie_word_embeddings", False)),
        "attn_bias": bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2",
        "mlp_bias": False,
        "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def write_trtllm_checkpoint(
    weights: nn.Module | Iterable[tuple[str, torch.Tensor]],
    config: Any,
    out_dir: str,
    family: str,
    tp_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """Write a TensorRT-LLM checkpoint: ``config.json`` and ``rank{r}.safetensors`` for ``r < tp_size``.

    ``weights`` is a model (streamed with :func:`iter_full_params`) or ``(hf_name, tensor)`` pairs. Each
    rank's file holds that rank's column / row / fused-QKV / vocab shards under engine names. Files are
    written atomically. Returns the paths written.
    """
    from safetensors.torch import save_file

    if family not in ENGINE_FAMILIES:
        raise ValueError(
            f"no TensorRT-LLM checkpoint layout for family {family!r}; supported: {ENGINE_FAMILIES}"
        )
    os.makedirs(out_dir, exist_ok=True)
    stream = list(iter_full_params(weights) if isinstance(weights, nn.Module) else weights)
    if getattr(config, "tie_word_embeddings", False):
        stream = [(n, t) for n, t in stream if n != "lm_head.weight"]
    paths = []
    for rank in range(tp_size):
        shards = {
            n: t.to(dtype).contiguous().cpu()
            for n, t in reshard_for_tp(stream, family, config, rank, tp_size)
        }
        path = os.path.join(out_dir, f"rank{rank}.safetensors")
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp_", suffix=".safetensors")
        os.close(fd)
        save_file(shards, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
        paths.append(path)
    cfg_path = os.path.join(out_dir, "config.json")
    dtype_name = str(dtype).removeprefix("torch.")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(trtllm_checkpoint_config(config, tp_size, dtype_name), f, indent=2)
    os.replace(tmp, cfg_path)
    return [cfg_path, *paths]
