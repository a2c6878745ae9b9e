"""Generation backends for rollouts and the weight plumbing that keeps them in step with training.

``HFBackend`` (reference, ``model.generate``), ``CompiledBackend`` (static KV cache, compiled and
CUDA-graph-captured decode step), ``TRTLLMBackend`` (TensorRT-LLM LLM API, optional extra); all follow
:class:`GenerationBackend`. See ``docs/generation.md``.
"""

from rlhf_kit.generation.base import GenerationBackend, GenerationOutput, SamplingParams, load_weights_
from rlhf_kit.generation.compiled import CompiledBackend
from rlhf_kit.generation.hf import HFBackend
from rlhf_kit.generation.trtllm import TRTLLMBackend

__all__ = [
    "CompiledBackend",
    "GenerationBackend",
    "GenerationOutput",
    "HFBackend",
    "SamplingParams",
    "TRTLLMBackend",
    "load_weights_",
]
