import copy
import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
from rlhf_kit.models import TokenValueModel, response_values, reward_scores
from rlhf_kit.ppo import (
    ExperienceConfig,
    FunctionScorer,
    RewardModelScorer,
    UpdateConfig,
    compute_advantages,
    make_experience,
    ppo_update,
)
from rlhf_kit.rollout import RolloutBuffer
from tests.conftest import make_causal_lm, make_reward_model


def fake_generation(tokenizer, b=4, p=5, n=6, seed=0):
    """Left-padded prompts + right-padded responses with known lengths and EOS placement."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, 500, (b, p + n), generator=g)
    am = torch.ones(b, p + n, dtype=torch.long)
    prompt_pad = [0, 2, 1, 0][:b]
    resp_len = [6, 3, 1, 4][:b]
    finished = torch.tensor([False, True, True, True][:b])
    rmask = torch.zeros(b, n, dtype=torch.long)
    for i in range(b):
        seq[i, : prompt_pad[i]] = tokenizer.pad_token_id
        am[i, : prompt_pad[i]] = 0
        rmask[i, : resp_len[i]] = 1
        if finished[i]:
            seq[i, p + resp_len[i] - 1] = tokenizer.eos_token_id
        seq[i, p + resp_len[i] :] = tokenizer.pad_token_id
        am[i, p + resp_len[i] :] = 0
    return SimpleNamespace(
        sequences=seq, attention_mask=am, response_mask=rmask, finished=finished, prompt_length=p
    )


@pytest.fixture
def four_models(tokenizer):
    actor = make_causal_lm(tokenizer, seed=1)
    ref = make_causal_lm(tokenizer, seed=2)
    rm = make_reward_model(tokenizer, seed=3)
    critic = TokenValueModel(make_reward_model(tokenizer, seed=4))
    return actor, ref, critic, rm


def test_make_experience_shapes_alignment_and_masks(tokenizer, four_models):
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    cfg = ExperienceConfig(temperature=0.8, micro_batch_size=3)
    r = make_experience(gen, actor, ref, critic, RewardModelScorer(rm), cfg)
    assert r.logprobs.shape == r.values.shape == (4, 6)
    # zero outside the response mask
    outside = r.response_mask == 0
    assert r.logprobs[outside].abs().sum() == 0 and r.values[outside].abs().sum() == 0
    # row 2 has prompt padding 1 and one response token: its log-prob equals an unpadded recompute
    seq = gen.sequences[2, 1:6]
    with torch.no_grad():
        logits = actor(input_ids=seq[None]).logits[0, -2].float() / 0.8
    expected = torch.log_softmax(logits, -1)[seq[-1]]
    assert r.logprobs[2, 0].item() == pytest.approx(expected.item(), abs=1e-5)
    # the score is the RM read at the last real token (the EOS), unpadded
    with torch.no_grad():
        s = rm(input_ids=gen.sequences[1:2, 2:8]).logits[0, 0]
    assert r.scores[1].item() == pytest.approx(s.item(), abs=1e-5)
    # value of the first response token = critic at the last prompt position
    with torch.no_grad():
        v = critic(gen.sequences[:1], gen.attention_mask[:1])[0, 4]
    assert r.values[0, 0].item() == pytest.approx(v.item(), abs=1e-5)


def test_make_experience_reads_the_padding_once_per_micro_batch(tokenizer, four_models, monkeypatch):
    """The reference, actor and critic passes share one left alignment per micro-batch (each reading
    it is a device-to-host sync); the results equal those of passes that find it themselves."""
    from rlhf_kit.models import layout
    from rlhf_kit.ppo import experience

    actor, ref, critic, rm = four_models
    gen, cfg, scorer = fake_generation(tokenizer), ExperienceConfig(micro_batch_size=3), RewardModelScorer(rm)
    want = {"ref": [], "values": []}
    for a, b in zip(gen.sequences.split(3), gen.attention_mask.split(3)):
        want["ref"].append(sequence_logprobs(ref, a, b, 5))
        want["values"].append(response_values(critic, a, b, 5))
    shared, found, real = [], [], layout.left_alignment
    monkeypatch.setattr(experience, "left_alignment", lambda m: shared.append(m) or real(m))
    monkeypatch.setattr(layout, "left_alignment", lambda m: found.append(m) or real(m))
    r = make_experience(gen, actor, ref, critic, scorer, cfg)
    assert len(shared) == 2 and not found  # two micro-batches; no pass read the padding again
    torch.testing.assert_close(r.ref_logprobs, torch.cat(want["ref"]) * gen.response_mask, rtol=0, atol=0)
    torch.testing.assert_close(r.values, torch.cat(want["values"]) * gen.response_mask, rtol=0, atol=0)


def test_make_experience_takes_the_samplers_logprobs_without_an_actor_pass(tokenizer, four_models):
    """old_logprobs="sampler": the rollout's old log-probs are the generation's (masked), the actor never
    runs, and everything else equals the recomputing path's."""
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    gen.logprobs = -torch.rand(gen.response_mask.shape, generator=torch.Generator().manual_seed(5))
    gen.logprobs[-1, -1] = 7.0  # outside row 3's response: must not survive the mask

    class NoForward(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the actor ran")

    scorer = RewardModelScorer(rm)
    want = make_experience(gen, actor, ref, critic, scorer, ExperienceConfig(micro_batch_size=3))
    cfg = ExperienceConfig(micro_batch_size=3, old_logprobs="sampler")
    got = make_experience(gen, NoForward(), ref, critic, scorer, cfg)
    torch.testing.assert_close(got.logprobs, gen.logprobs * gen.response_mask, rtol=0, atol=0)
    for name in ("ref_logprobs", "values", "scores", "response_mask"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    assert not torch.equal(got.logprobs, want.logprobs)
    with pytest.raises(ValueError, match="old_logprobs"):
        ExperienceConfig(old_logprobs="actor")


def test_compute_advantages_known_answer():
    from rlhf_kit.rollout import Rollout

    m = torch.tensor([[1, 1, 0]])
    z = torch.zeros(1, 3)
    r = Rollout(
        sequences=torch.zeros(1, 5, dtype=torch.long),
        attention_mask=torch.ones(1, 5, dtype=torch.long),
        response_mask=m,
        logprobs=torch.tensor([[-1.0, -2.0, 0.0]]),
        ref_logprobs=torch.tensor([[-1.5, -1.0, 0.0]]),
        values=torch.tensor([[0.5, 1.0, 0.0]]),
        rewards=z,
        advantages=z,
        returns=z,
        scores=torch.tensor([3.0]),
        finished=torch.tensor([False]),
    )
    cfg = ExperienceConfig(gamma=1.0, lam=1.0, normalize_advantages=False, missing_eos_penalty=1.0)
    out, stats = compute_advantages(r, kl_coef=0.1, cfg=cfg)
    # k1 kl = [0.5, -1.0]; score 3 - 1 (no EOS) = 2 on token 1
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0]]))
    # lam = gamma = 1: advantages = reward-to-go - V
    torch.testing.assert_close(out.advantages, torch.tensor([[2.05 - 0.5, 2.1 - 1.0, 0.0]]))
    torch.testing.assert_close(out.returns, torch.tensor([[2.05, 2.1, 0.0]]))
    assert stats["kl/seq_mean"] == pytest.approx(-0.5)
    assert stats["reward/score_mean"] == pytest.approx(2.0) and stats["response/length_mean"] == 2.0
    assert all(type(v) is float for v in stats.values())


def test_compute_advantages_reads_the_device_twice(host_reads):
    """The step's statistics come back in one stacked copy, plus the all-rank KL mean's: two reads of the
    device per step, not one per statistic (each would wait for the GPU's queue to drain)."""
    from rlhf_kit.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    b, n = 4, 6
    m = (torch.arange(n) < torch.tensor([[6], [3], [1], [5]])).long()
    r = Rollout(
        sequences=torch.zeros(b, 8 + n, dtype=torch.long),
        attention_mask=torch.ones(b, 8 + n, dtype=torch.long),
        response_mask=m,
        logprobs=-torch.rand(b, n, generator=g),
        ref_logprobs=-torch.rand(b, n, generator=g),
        values=torch.randn(b, n, generator=g),
        rewards=torch.zeros(b, n),
        advantages=torch.zeros(b, n),
        returns=torch.zeros(b, n),
        scores=torch.randn(b, generator=g),
        finished=torch.tensor([True, False, True, True]),
    )
    host_reads.clear()
    _, stats = compute_advantages(r, 0.1, ExperienceConfig())
    assert len(host_reads) == 2, host_reads
    assert len(stats) == 11 and all(type(v) is float for v in stats.values())


def test_function_scorer_decodes_prompt_and_response(tokenizer):
    gen = fake_generation(tokenizer)
    seen = {}

    def fn(prompts, responses):
        seen["p"], seen["r"] = prompts, responses
        return [len(r) for r in responses]

    scores = FunctionScorer(fn, tokenizer)(
        gen.sequences, gen.attention_mask, prompt_length=5, response_mask=gen.response_mask
    )
    assert scores.shape == (4,)
    expected = tokenizer.decode(gen.sequences[0, 5:], skip_special_tokens=True)
    assert seen["r"][0] == expected and scores[0] == len(expected)
    assert seen["p"][1] == tokenizer.decode(gen.sequences[1, 2:5])


def _update(actor, critic, rollout, micro, mini, epochs=1, tokens=0, packed="auto"):
    a_opt = torch.optim.AdamW(actor.parameters(), lr=1e-3)
    c_opt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    buf = RolloutBuffer(seed=0)
    buf.append(rollout)
    return ppo_update(
        actor,
        critic,
        a_opt,
        c_opt,
        buf,
        PPOPolicyLoss(0.2, entropy_coef=0.01),
        ValueLoss(0.2),
        UpdateConfig(
            mini_batch_size=mini,
            micro_batch_size=micro,
            ppo_epochs=epochs,
            max_grad_norm=1e9,
            micro_batch_tokens=tokens,
            packed=packed,
        ),
        ExperienceConfig(temperature=0.8),
    )


def test_micro_batch_times_accumulation_equivalence(tokenizer, four_models):
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    cfg = ExperienceConfig(temperature=0.8)
    r, _ = compute_advantages(make_experience(gen, actor, ref, critic, RewardModelScorer(rm), cfg), 0.05, cfg)
    # float64: in float32 the two accumulation orders differ by rounding (~1e-8 in the gradients), which
    # AdamW's m / (sqrt(v) + eps) amplifies to ~2e-6 in single weights (a tolerance that then breaks on
    # small changes elsewhere); in float64 they agree to ~1e-12, and a wrong scale would not
    # micro 4 is the whole batch, whose widest prompt and response leave nothing to trim; micro 1 and the
    # token budget (14: micro-batches of samples 0 | 3 | 1 and 2) cut every micro-batch to its own columns
    a1, c1 = copy.deepcopy(actor).double(), copy.deepcopy(critic).double()
    a4, c4 = copy.deepcopy(actor).double(), copy.deepcopy(critic).double()
    ab, cb = copy.deepcopy(actor).double(), copy.deepcopy(critic).double()
    s1 = _update(a1, c1, r, micro=1, mini=4)
    s4 = _update(a4, c4, r, micro=4, mini=4)
    sb = _update(ab, cb, r, micro=4, mini=4, tokens=14)
    for p1, p4, pb in zip(
        list(a1.parameters()) + list(c1.parameters()),
        list(a4.parameters()) + list(c4.parameters()),
        list(ab.parameters()) + list(cb.parameters()),
    ):
        torch.testing.assert_close(p1, p4, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(pb, p4, atol=1e-10, rtol=1e-8)
    assert s1["policy/grad_norm"] == pytest.approx(s4["policy/grad_norm"], rel=1e-9)
    assert sb["policy/grad_norm"] == pytest.approx(s4["policy/grad_norm"], rel=1e-9)
    # and the update did change the weights
    assert not torch.allclose(next(a1.parameters()).float(), next(actor.parameters()))


def test_update_moves_policy_towards_positive_advantages(tokenizer, four_models):
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    cfg = ExperienceConfig(temperature=1.0, normalize_advantages=False)
    r = make_experience(gen, actor, ref, critic, RewardModelScorer(rm), cfg)
    r.advantages = torch.where(torch.arange(4)[:, None] < 2, 1.0, -1.0) * r.response_mask
    before = r.logprobs.clone()
    for _ in range(3):
        _update(actor, critic, r, micro=2, mini=4)
    with torch.no_grad():
        after = sequence_logprobs(actor, r.sequences, r.attention_mask, 5, 1.0) * r.response_mask
    delta = (after - before).sum(-1)
    assert delta[0] > 0 and delta[1] > 0 and delta[2] < 0 and delta[3] < 0


def test_reward_scorer_matches_reward_scores(tokenizer, four_models):
    *_, rm = four_models
    gen = fake_generation(tokenizer)
    torch.testing.assert_close(
        RewardModelScorer(rm)(gen.sequences, gen.attention_mask),
        reward_scores(rm, gen.sequences, gen.attention_mask),
    )


def test_prompt_stream_resumes_exactly_and_shards():
    from rlhf_kit.ppo import PromptStream

    prompts = [[i] for i in range(7)]
    a = PromptStream(prompts, seed=5)
    first = [a.next_batch(3) for _ in range(3)]  # crosses an epoch boundary
    flat = [x[0] for b in first for x in b]
    assert sorted(flat[:7]) == list(range(7))  # epoch 0 is a permutation
    state = a.state_dict()
    rest = [a.next_batch(3) for _ in range(4)]
    b = PromptStream(prompts, seed=5)
    b.load_state_dict(state)
    assert [b.next_batch(3) for _ in range(4)] == rest
    # each epoch is a permutation
    c = PromptStream(prompts, seed=1)
    assert sorted(x[0] for x in c.next_batch(7)) == list(range(7))
    # ranks see disjoint slices of the same global batch
    r0, r1 = PromptStream(prompts, seed=2), PromptStream(prompts, seed=2)
    s0, s1 = r0.next_batch(4, 0, 2), r1.next_batch(4, 1, 2)
    assert len(s0) == len(s1) == 2 and not set(map(tuple, s0)) & set(map(tuple, s1))


def test_split_and_merge_generations_roundtrip(tokenizer):
    from rlhf_kit.ppo import merge_generations, split_generation

    gen = fake_generation(tokenizer)
    gen.logprobs = torch.randn(gen.response_mask.shape) * gen.response_mask
    samples = split_generation(gen)
    assert [len(s["response"]) for s in samples] == [6, 3, 1, 4]
    assert [len(s["prompt"]) for s in samples] == [5, 3, 4, 5]
    merged = merge_generations(samples, tokenizer.pad_token_id)
    for field in ("sequences", "attention_mask", "response_mask", "logprobs", "finished"):
        torch.testing.assert_close(getattr(merged, field), getattr(gen, field), msg=field)
    assert merged.prompt_length == gen.prompt_length
    # a subset regroups to its own widths
    sub = merge_generations([samples[1], samples[2]], tokenizer.pad_token_id)
    assert sub.sequences.shape == (2, 4 + 3) and sub.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_load_ppo_models_lora_reference_and_vocab_check(tokenizer, tmp_path):
    from rlhf_kit.ppo import load_ppo_models
    from rlhf_kit.tiny import save_tiny_pretrained
    from rlhf_kit.training.hf import LoraSettings

    actor_dir = save_tiny_pretrained(str(tmp_path / "actor"), "causal_lm", tokenizer=tokenizer)
    gpt2_dir = save_tiny_pretrained(str(tmp_path / "gpt2"), "causal_lm", "gpt2", tokenizer, resid_pdrop=0.3)
    rm_dir = save_tiny_pretrained(str(tmp_path / "rm"), "reward", tokenizer=tokenizer)
    full = load_ppo_models(actor_dir, rm_dir, rm_dir, tokenizer)
    assert full.reference is not None and not any(p.requires_grad for p in full.reference.parameters())
    dropouts = [
        m
        for m in load_ppo_models(gpt2_dir, rm_dir, None, tokenizer).actor.modules()
        if isinstance(m, torch.nn.Dropout)
    ]
    assert dropouts and all(m.p == 0 for m in dropouts)  # the config asked for 0.3
    lora = load_ppo_models(actor_dir, rm_dir, None, tokenizer, lora=LoraSettings(r=4))
    assert lora.reference is None and lora.reward_model is None
    ids = torch.randint(3, 500, (2, 8))
    mask = torch.ones_like(ids)
    torch.nn.init.normal_(next(p for n, p in lora.actor.named_parameters() if "lora_B" in n))
    with torch.no_grad():
        adapted = sequence_logprobs(lora.actor, ids, mask, 4)
        with lora.reference_fn():
            base = sequence_logprobs(lora.actor, ids, mask, 4)
        plain = sequence_logprobs(full.reference, ids, mask, 4)
    torch.testing.assert_close(base, plain)  # adapters off = the initial actor
    assert not torch.allclose(adapted, base)
    from transformers import AutoModelForSequenceClassification

    from rlhf_kit.tiny import tiny_config

    small = str(tmp_path / "small")
    AutoModelForSequenceClassification.from_config(
        tiny_config("llama", vocab_size=100, num_labels=1)
    ).save_pretrained(small)
    with pytest.raises(ValueError, match="does not share the actor's tokenizer"):
        load_ppo_models(actor_dir, small, None, tokenizer)


def test_update_forwards_run_without_cudnn_sdpa(tokenizer, four_models):
    """cuDNN's SDPA backward is NaN on left-padding rows (rlhf_kit.models.attention): every training
    forward of the actor and critic must run with that kernel excluded, and the choice must not leak."""
    from rlhf_kit.models.attention import cudnn_sdpa_enabled

    actor, ref, critic, rm = four_models
    cfg = ExperienceConfig(temperature=0.8)
    r, _ = compute_advantages(
        make_experience(fake_generation(tokenizer), actor, ref, critic, RewardModelScorer(rm), cfg), 0.05, cfg
    )
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda *_: seen.append(cudnn_sdpa_enabled())) for m in (actor, critic)
    ]
    torch.backends.cuda.enable_cudnn_sdp(True)  # as a caller may leave it (restored by conftest)
    assert cudnn_sdpa_enabled()
    _update(actor, critic, r, micro=2, mini=4)
    for h in hooks:
        h.remove()
    assert seen and not any(seen), seen
    assert len(seen) == 4  # 2 micro-batches x (actor + critic)
    assert cudnn_sdpa_enabled()


@pytest.mark.parametrize("packed", ["off", "on"])
def test_update_reads_statistics_to_the_host_once_not_per_micro_batch(
    tokenizer, four_models, host_reads, packed
):
    """Each float() of a device tensor waits for the GPU; the micro-batch loop must not do one per
    statistic (the host would stall before every forward): the count of our reads (those made from
    rlhf_kit's code; transformers' mask building makes its own) does not grow with the number of
    micro-batches, and the statistics are still plain floats. Packed passes too: each micro-batch's
    real-token counts come with the mini-batch's one read of the extents."""
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    cfg = ExperienceConfig(temperature=0.8)
    r, _ = compute_advantages(make_experience(gen, actor, ref, critic, RewardModelScorer(rm), cfg), 0.05, cfg)

    def reads_for(micro):
        host_reads.clear()
        stats = _update(copy.deepcopy(actor), copy.deepcopy(critic), r, micro=micro, mini=4, packed=packed)
        return len(host_reads.ours()), stats

    n4, s4 = reads_for(4)  # one micro-batch
    n1, s1 = reads_for(1)  # four micro-batches
    assert n1 == n4, (n1, n4)
    assert set(s1) == set(s4) and all(isinstance(v, float) and math.isfinite(v) for v in s1.values())
    if packed == "on":  # the same update as the padded passes
        padded = _update(copy.deepcopy(actor), copy.deepcopy(critic), r, micro=1, mini=4, packed="off")
        assert s1 == pytest.approx(padded, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "micro, tokens, widths", [(2, 0, [(2, 11), (2, 7)]), (4, 14, [(1, 11), (1, 9), (2, 7)])]
)
def test_update_micro_batches_group_by_length_and_skip_padding(tokenizer, four_models, micro, tokens, widths):
    """The forward passes see similar lengths together, each cut to the columns its samples use:
    fake_generation's samples use 11, 6, 5 and 9 columns (prompt 5 - left padding + response)."""
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    cfg = ExperienceConfig(temperature=0.8)
    r, _ = compute_advantages(make_experience(gen, actor, ref, critic, RewardModelScorer(rm), cfg), 0.05, cfg)
    seen = []
    a = copy.deepcopy(actor)
    a.register_forward_pre_hook(
        lambda m, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    _update(a, copy.deepcopy(critic), r, micro=micro, mini=4, tokens=tokens)
    assert seen == widths


def test_update_leaves_the_trim_to_its_micro_batches(tokenizer, four_models, monkeypatch):
    """The micro-batches are cut to their own columns, so the update takes its mini-batches untrimmed
    (a trim reads the device once per mini-batch); the same update as over trimmed mini-batches."""
    from rlhf_kit import rollout as rollout_module

    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    cfg = ExperienceConfig(temperature=0.8)
    r, _ = compute_advantages(make_experience(gen, actor, ref, critic, RewardModelScorer(rm), cfg), 0.05, cfg)
    r.response_mask[:, -1] = 0  # a trailing column no sample uses: a trim would cut it
    trimmed = rollout_module.trim_responses(r)  # every mini-batch trimmed: the column gone from all
    assert trimmed.response_mask.shape[1] < r.response_mask.shape[1]
    want = _update(copy.deepcopy(actor), copy.deepcopy(critic), trimmed, micro=2, mini=2)
    trims = []
    real = rollout_module.trim_responses
    monkeypatch.setattr(rollout_module, "trim_responses", lambda x: trims.append(x) or real(x))
    got = _update(copy.deepcopy(actor), copy.deepcopy(critic), r, micro=2, mini=2)
    assert not trims
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    buf = RolloutBuffer(seed=0)
    buf.set_data(r)
    assert {mb.response_mask.shape[1] for mb in buf.minibatches(2, trim=False)} == {r.response_mask.shape[1]}
    assert next(buf.minibatches(2)).response_mask.shape[1] < r.response_mask.shape[1]  # trim=True: cut


def test_reference_is_a_private_fp32_copy_of_a_real_like_actor(tmp_path):
    """The reference is copied from the loaded actor (one read of the checkpoint): bf16 on disk, fp32 and
    equal to the actor in memory, its tied embeddings still tied, sharing no storage with the actor, so an
    update of the actor leaves it where it was."""
    from rlhf_kit.ppo import load_ppo_models
    from rlhf_kit.tiny import save_real_like_checkpoint

    path = save_real_like_checkpoint(str(tmp_path / "actor"))
    from rlhf_kit.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path, padding_side="left")
    models = load_ppo_models(path, None, None, tok, gradient_checkpointing=True)
    actor, ref = models.actor, models.reference
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert {p.dtype for p in ref.parameters()} == {torch.float32}
    assert ref.get_input_embeddings().weight is ref.get_output_embeddings().weight
    actor_state = actor.state_dict()
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(t, actor_state[name], rtol=0, atol=0)
        assert t.data_ptr() != actor_state[name].data_ptr(), name
    ids = torch.randint(3, len(tok), (2, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = sequence_logprobs(ref, ids, mask, 4)
        for p in actor.parameters():
            p.add_(0.1)
        after = sequence_logprobs(ref, ids, mask, 4)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_update_grows_its_micro_batches_from_the_memory_measured_in_its_second_update(tokenizer, four_models):
    from rlhf_kit.training.memory_budget import MemoryBudget
    from tests.unit.training.test_memory_budget import FakeDevice

    actor, ref, critic, rm = four_models
    cfg = ExperienceConfig(temperature=0.8)
    r, _ = compute_advantages(
        make_experience(fake_generation(tokenizer), actor, ref, critic, RewardModelScorer(rm), cfg), 0.05, cfg
    )
    # samples cost 11, 9, 6 and 5 padded tokens (sorted); a budget of 14 cuts 0 | 3 | 1 and 2, the whole
    # mini-batch is 4 x 11 = 44 tokens: what a device with room to spare grows the budget to
    dev = FakeDevice(total=10**12)
    budget = MemoryBudget(tokens=14, fraction=0.8, max_tokens=44, probe=dev.probe())
    upd = UpdateConfig(mini_batch_size=4, micro_batch_size=4, max_grad_norm=1e9, micro_batch_tokens=14)
    a_opt = torch.optim.AdamW(actor.parameters(), lr=1e-4)
    c_opt = torch.optim.AdamW(critic.parameters(), lr=1e-4)
    passes = []
    actor.register_forward_pre_hook(lambda module, args: passes.append(1))
    counts, tokens = [], []
    for train_actor in (False, True, True, True):
        upd.train_actor = train_actor
        buf = RolloutBuffer(seed=0)
        buf.append(r)
        before = len(passes)
        stats = ppo_update(
            actor, critic, a_opt, c_opt, buf, PPOPolicyLoss(0.2), ValueLoss(0.2), upd, cfg, budget=budget
        )
        counts.append(len(passes) - before)
        tokens.append(stats["batch/micro_batch_tokens"])
    # a critic warm-up update neither counts nor measures (the actor's memory is missing from it); the
    # first actor update makes its optimizer state; the next measures its first micro-batch and keeps
    # its cut; the last runs the whole mini-batch in one pass
    assert counts == [0, 3, 3, 1]
    assert tokens == [14, 14, 44, 44]
    assert budget.measured and budget.updates == 3


def test_default_gradient_clipping_reads_nothing_until_the_end(tokenizer, four_models, host_reads):
    """The update's default clip_grad keeps the gradient norms on the device (each float() would wait for
    the GPU after every optimizer step); they reach the host with the other statistics, as floats."""
    actor, ref, critic, rm = four_models
    cfg = ExperienceConfig(temperature=0.8)
    r, _ = compute_advantages(
        make_experience(fake_generation(tokenizer), actor, ref, critic, RewardModelScorer(rm), cfg), 0.05, cfg
    )
    host_reads.clear()
    stats = _update(actor, critic, r, micro=2, mini=2)  # two mini-batches: two optimizer steps per model
    assert [name for name, where in host_reads if where.endswith("update.py")] == [], host_reads
    assert isinstance(stats["policy/grad_norm"], float) and stats["value/grad_norm"] > 0


def test_scoring_finds_each_micro_batchs_padding_once(tokenizer, four_models, host_reads):
    """The reward model gets the alignment make_experience already read (each read waits for a GPU): one
    read of the padding per scoring micro-batch, with the scores of the reward model's own read."""
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    cfg = ExperienceConfig(temperature=0.8, micro_batch_size=2)  # two scoring micro-batches
    host_reads.clear()
    r = make_experience(gen, actor, ref, critic, RewardModelScorer(rm), cfg)
    padding_reads = [where for _, where in host_reads if where.endswith("layout.py")]
    assert len(padding_reads) == 2, host_reads
    torch.testing.assert_close(r.scores, reward_scores(rm, gen.sequences, gen.attention_mask))
