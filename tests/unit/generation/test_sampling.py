"""On-device sampling: top-k / top-p sets on a known distribution, agreement with HF's warpers, and the
exponential-race draw reproducing the filtered distribution."""

from __future__ import annotations

import math

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rlhf_kit.generation.compiled import filter_top_k_top_p, sample_from_scores

PROBS = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # order scrambled on purpose


def _kept(scores: torch.Tensor) -> set[int]:
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def test_top_k_top_p_sets_on_known_distribution():
    logits = PROBS.log()[None]
    assert _kept(filter_top_k_top_p(logits, 2, 1.0, True, False)) == {1, 3}
    assert _kept(filter_top_k_top_p(logits, 0, 0.75, False, True)) == {1, 3, 4}  # 0.5+0.2 < 0.75
    assert _kept(filter_top_k_top_p(logits, 0, 0.4, False, True)) == {1}  # best token always kept
    assert _kept(filter_top_k_top_p(logits, 0, 0.999, False, True)) == {0, 1, 2, 3, 4}
    # top-k first, then top-p on the renormalised top 3 (0.588, 0.235, 0.176): 0.588 < 0.6 <= 0.823
    assert _kept(filter_top_k_top_p(logits, 3, 0.6, True, True)) == {1, 3}
    # surviving logits are unchanged; tensors work as parameters (what the captured graph uses)
    out = filter_top_k_top_p(logits, torch.tensor(2), torch.tensor(1.0), True, False)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


def test_filters_agree_with_hf_warpers():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 200, generator=gen) * 3
    for k, p in [(10, 1.0), (0, 0.9), (50, 0.7), (0, 0.3), (3, 0.99)]:
        ref = scores.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        ours = filter_top_k_top_p(scores, k, p, k > 0, p < 1)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), (k, p)


def test_race_sampling_reproduces_the_filtered_distribution():
    torch.manual_seed(0)
    n = 40000
    logits = PROBS.log().expand(n, -1).contiguous()
    filtered = filter_top_k_top_p(logits, 0, 0.75, False, True)
    draws = sample_from_scores(filtered, greedy=False)
    freq = torch.bincount(draws, minlength=5).float() / n
    expected = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.15]) / 0.85
    # 4 standard errors of a binomial proportion
    tol = 4 * math.sqrt(0.25 / n)
    assert torch.all((freq - expected).abs() < tol), (freq, expected)
    assert freq[0] == 0 and freq[2] == 0
    assert torch.equal(sample_from_scores(logits[:3], greedy=True), torch.tensor([1, 1, 1]))
