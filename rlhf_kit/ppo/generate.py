"""Step 1 of PPO, generate: prompts -> backend -> ``GenerationOutput`` micro-batches, statically split
over ranks or handed out dynamically and rebalanced (split/merge of generations per sample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rlhf_kit.models.transfer import batch_to_device, host_tensor

#: What happens to the backend's KV cache and captured CUDA graphs after a rollout (``--generation-cache``).
GENERATION_CACHE = ("auto", "keep", "release")


def keep_generation_cache(backend, mode: str, device: torch.device | str, share: float = 0.05) -> bool:
    """Whether to keep ``backend``'s KV cache and captured graphs after a rollout (ask while it is awake).

    ``"keep"`` / ``"release"`` decide; ``"auto"`` keeps them on CUDA when the cache takes at most
    ``share`` of the device's memory. Kept, the next rollout replays its CUDA graph instead of capturing
    it again (bench config A on an H100: generation 0.224 -> 0.179 s per PPO step, peak +0.34 GiB;
    docs/benchmarks.md); released, training gets that memory back.
    """
    if mode not in GENERATION_CACHE:
        raise ValueError(f"generation cache {mode!r}: choose one of {', '.join(GENERATION_CACHE)}")
    if mode != "auto":
        return mode == "keep"
    device = torch.device(device)
    held = backend.kv_cache_bytes() if hasattr(backend, "kv_cache_bytes") else 0
    if device.type != "cuda" or held == 0:
        return False
    return held <= share * torch.cuda.get_device_properties(device).total_memory


def generate_rollouts(
    backend,
    prompts: Sequence[Sequence[int]],
    collate: Callable[[list], dict],
    params,
    micro_batch_size: int,
    device: torch.device | str,
    release: bool = True,
) -> list:
    """Generate for ``prompts`` in micro-batches of ``micro_batch_size`` (left-padded by ``collate``),
    waking the backend's KV cache for the duration; ``release=False`` keeps the cache (and the compiled
    backend's captured graphs) for the next rollout when memory allows. Returns one ``GenerationOutput``
    per micro-batch."""
    outs = []
    backend.wake()
    try:
        for s in range(0, len(prompts), micro_batch_size):
            batch = collate(list(prompts[s : s + micro_batch_size]))
            outs.append(
                backend.generate(  # the prompts cross without a wait (pinned, non-blocking)
                    host_tensor(batch["input_ids"], device),
                    host_tensor(batch["attention_mask"], device),
                    params,
                )
            )
    finally:
        if release:
            backend.sleep()
    return outs


def split_generation(gen) -> list[dict[str, torch.Tensor]]:
    """One dict per sample of a ``GenerationOutput``, padding removed: ``prompt (p_i,)``, ``response
    (n_i,)``, ``response_mask (n_i,)``, ``logprobs (n_i,)``, ``finished ()``. Inverse: :func:`merge_generations`."""
    p = gen.prompt_length
    out = []
    for i in range(gen.sequences.shape[0]):
        n_i = int(gen.response_mask[i].sum())
        prompt_mask = gen.attention_mask[i, :p].bool()
        out.append(
            {
                "prompt": gen.sequences[i, :p][prompt_mask],
                "response": gen.sequences[i, p : p + n_i],
                "response_mask": gen.response_mask[i, :n_i],
                "logprobs": gen.logprobs[i, :n_i],
                "finished": gen.finished[i],
            }
        )
    return out


def merge_generations(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int):
    """Samples from :func:`split_generation` back into one ``GenerationOutput`` (prompts left-padded,
    responses right-padded to the longest of the group)."""
    from rlhf_kit.generation.base import GenerationOutput

    if not samples:
        raise ValueError("merge_generations: no samples")
    b = len(samples)
    p = max(len(s["prompt"]) for s in samples)
    n = max(1, max(len(s["response"]) for s in samples))
    ref = samples[0]["prompt"]
    seq = torch.full((b, p + n), pad_token_id, dtype=ref.dtype, device=ref.device)
    am = torch.zeros((b, p + n), dtype=torch.long, device=ref.device)
    rmask = torch.zeros((b, n), dtype=torch.long, device=ref.device)
    logprobs = torch.zeros((b, n), dtype=torch.float32, device=ref.device)
    for i, s in enumerate(samples):
        lp, ln = len(s["prompt"]), len(s["response"])
        seq[i, p - lp : p] = s["prompt"]
        seq[i, p : p + ln] = s["response"]
        am[i, p - lp : p] = 1
        am[i, p : p + ln] = s["response_mask"]
        rmask[i, :ln] = s["response_mask"]
        logprobs[i, :ln] = s["logprobs"]
    finished = torch.stack([s["finished"].bool() for s in samples])
    return GenerationOutput(seq, p, rmask, logprobs, finished, am)


def generate_rollouts_dynamic(
    backend,
    prompts: Sequence[Sequence[int]],
    collate: Callable[[list], dict],
    params,
    micro_batch_size: int,
    device: torch.device | str,
    pad_token_id: int,
    release: bool = True,
) -> tuple[list, object]:
    """Data-parallel generation with dynamic hand-out (a rank that finishes early takes more), then a
    rebalance so every rank scores and trains on the same number of samples.

    Every rank passes the same global ``prompts``; micro-batches of ``micro_batch_size`` are claimed
    first come, first served from a counter in the process group's store. The backend must generate
    locally (an inference copy, or an unsharded model): FSDP-sharded generation is collective.
    ``release=False`` keeps the backend's cache and graphs afterwards (see :func:`generate_rollouts`).
    Returns this rank's generations (micro-batches of ``micro_batch_size``) and the rebalance stats.
    """
    from rlhf_kit.generation.dispatch import DynamicDispatcher, rebalance_rollouts

    chunks = [list(prompts[s : s + micro_batch_size]) for s in range(0, len(prompts), micro_batch_size)]
    samples: list[dict] = []
    try:
        for i in DynamicDispatcher(len(chunks)):
            (gen,) = generate_rollouts(
                backend, chunks[i], collate, params, micro_batch_size, device, release=False
            )
            samples += [{k: v.cpu() for k, v in s.items()} for s in split_generation(gen)]
    finally:
        if release:
            backend.sleep()
    samples, stats = rebalance_rollouts(samples)
    samples = [batch_to_device(s, device) for s in samples]  # pinned, asynchronous
    groups = [samples[s : s + micro_batch_size] for s in range(0, len(samples), micro_batch_size)]
    return [merge_generations(g, pad_token_id) for g in groups], stats
