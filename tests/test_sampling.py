"""Sampling: the sampler's math on hand-made logits (penalties, top-k/top-p/min-p, the exponential
race's distribution), and per-request behaviour on SmolLM2 (seeds, n, greedy, logprobs vs HF)."""
from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import SamplingMetadata, apply_penalties, sample
from engine.sampling_params import SamplingParams
from tests.helpers import chat_ids, hf_greedy, smollm2, smollm2_engine


def meta(b: int, v: int, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seeds=None, steps=None,
         top_logprobs=0, counts=None, seen=None, freq=0.0, presence=0.0, rep=1.0) -> SamplingMetadata:
    def col(x, dtype=torch.float32):
        return torch.as_tensor(x, dtype=dtype).expand(b).clone()
    m = SamplingMetadata(
        temperature=col(temperature), top_p=col(top_p), top_k=col(top_k or v, torch.int64),
        min_p=col(min_p), seeds=col(0 if seeds is None else seeds, torch.int64),
        steps=col(0 if steps is None else steps, torch.int64),
        all_greedy=bool((col(temperature) == 0).all()), use_top_k=0 < top_k < v, use_top_p=top_p < 1.0,
        use_min_p=min_p > 0.0, num_top_logprobs=top_logprobs)
    if counts is not None:
        m.output_counts = torch.as_tensor(counts, dtype=torch.float32).expand(b, v).clone()
        m.seen_mask = torch.as_tensor(seen, dtype=torch.bool).expand(b, v).clone()
        m.frequency_penalty, m.presence_penalty, m.repetition_penalty = col(freq), col(presence), col(rep)
    return m


def draws(probs: list[float], n: int = 4000, **kw) -> torch.Tensor:
    """Token counts of n draws from `probs` with seeds 0..n-1 (one batched sample call)."""
    logits = torch.tensor(probs).log().expand(n, len(probs))
    ids, _, _ = sample(logits, meta(n, len(probs), seeds=torch.arange(n), **kw))
    return torch.bincount(ids, minlength=len(probs))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs / probs.sum() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# -- penalties ------------------------------------------------------------------------------------

def test_frequency_penalty_makes_the_top_token_lose():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])
    m = meta(1, 4, temperature=0.0, counts=[[2, 0, 0, 0]], seen=[[1, 0, 0, 0]], freq=0.5)
    assert torch.allclose(apply_penalties(logits, m), torch.tensor([[2.0, 2.5, 0.0, -1.0]]))
    ids, logprob, _ = sample(logits, m)
    assert ids.tolist() == [1]
    assert logprob.item() == pytest.approx(logits.log_softmax(-1)[0, 1].item())   # raw, unpenalised


def test_presence_penalty_counts_a_token_once():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    m = meta(1, 3, counts=[[3, 1, 0]], seen=[[1, 1, 0]], presence=0.25)
    assert torch.allclose(apply_penalties(logits, m), torch.tensor([[0.75, 0.75, 1.0]]))


def test_repetition_penalty_divides_positive_multiplies_negative_seen_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5]])
    m = meta(1, 4, counts=[[0, 0, 0, 0]], seen=[[1, 1, 0, 0]], rep=2.0)        # seen in the prompt
    assert torch.allclose(apply_penalties(logits, m), torch.tensor([[1.0, -2.0, 0.5, -0.5]]))


def test_repetition_penalty_acts_on_the_models_logits_before_frequency():
    """vLLM order: the sign of the model's logit decides; 1.0 / 2 - 0.5 = 0 (not (1 - 0.5) / 2)."""
    m = meta(1, 2, counts=[[1, 0]], seen=[[1, 0]], freq=0.5, rep=2.0)
    assert torch.allclose(apply_penalties(torch.tensor([[1.0, 0.3]]), m), torch.tensor([[0.0, 0.3]]))


# -- filters and the sampler's distribution -------------------------------------------------------

def test_exponential_race_matches_softmax():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    counts = draws(probs.tolist(), n=20000)
    assert chi_square(counts, probs) < 25.0          # 5 dof: p ~ 1e-4
    # one seed across output steps draws from the same distribution
    logits = probs.log().expand(20000, 6)
    ids, _, _ = sample(logits, meta(20000, 6, seeds=7, steps=torch.arange(20000)))
    assert chi_square(torch.bincount(ids, minlength=6), probs) < 25.0


def test_temperature_scales_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    counts = draws(probs.tolist(), n=20000, temperature=0.5)
    assert chi_square(counts, probs ** 2) < 20.0


def test_top_k_keeps_the_k_best():
    counts = draws([0.4, 0.3, 0.2, 0.1], top_k=2)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0
    assert chi_square(counts[:2], torch.tensor([0.4, 0.3])) < 15.0


@pytest.mark.parametrize("top_p,kept", [(0.3, 1), (0.65, 2), (0.75, 3), (0.95, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    counts = draws(probs.tolist(), top_p=top_p)
    assert (counts[:kept] > 0).all() and counts[kept:].sum() == 0
    if kept > 1:
        assert chi_square(counts[:kept], probs[:kept]) < 20.0     # renormalised over the kept prefix


def test_min_p_masks_tokens_below_min_p_times_max():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    counts = draws(probs.tolist(), min_p=0.2)          # floor 0.1: only token 3 goes
    assert counts[3] == 0 and (counts[:3] > 0).all()
    assert chi_square(counts[:3], probs[:3]) < 20.0


def test_greedy_rows_beside_sampled_rows_and_raw_logprobs():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    temps = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.7])
    m = meta(6, 50, seeds=torch.arange(6), top_logprobs=4, top_k=10)
    m.temperature = temps
    ids, logprobs, top = sample(logits, m)
    greedy = temps == 0
    assert torch.equal(ids[greedy], logits.argmax(-1)[greedy])
    raw = logits.log_softmax(-1)
    assert torch.allclose(logprobs, raw.gather(1, ids[:, None]).squeeze(1))
    assert torch.allclose(top.values, raw.topk(4).values) and (top.values.diff(dim=-1) <= 0).all()
    assert torch.equal(top.indices[greedy, 0], ids[greedy])


# -- per request, on SmolLM2 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    _, tok, hf = smollm2()
    texts = ["Write a haiku about the sea.", "Tell me a story about a dragon.", "What is 2+2?",
             "Describe your favourite colour."]
    return tok, hf, [chat_ids(tok, t) for t in texts]


def run(engine, prompts, params) -> list[list[int]]:
    return [seqs[0].output_token_ids for seqs in engine.generate(prompts, params)]


MAX_TOKENS = 8


def sampled(seed, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_seed_gives_same_tokens_alone_batched_and_across_engines(smol):
    tok, hf, prompts = smol
    engine = smollm2_engine()
    alone = run(engine, [prompts[0]], sampled(42))[0]
    others = [sampled(s) for s in (1, 2, 3)]
    batched = run(engine, prompts[:3], [sampled(42)] + others[:2])[0]
    fresh = run(smollm2_engine(max_num_batched_tokens=16), [prompts[1], prompts[0]],
                [sampled(9), sampled(42)])[1]
    assert alone == batched == fresh
    assert len(alone) == MAX_TOKENS


def test_different_seeds_give_different_outputs(smol):
    tok, hf, prompts = smol
    outs = run(smollm2_engine(), [prompts[1]] * 3, [sampled(s) for s in (1, 2, 3)])
    assert len({tuple(o) for o in outs}) == 3


def test_n2_two_choices_share_prompt_blocks(smol):
    tok, hf, prompts = smol
    engine = smollm2_engine(block_size=16)
    p = prompts[1]
    a, b = engine.add_request("n2", p, sampled(5, n=2))
    shared = (len(p) - 1) // 16
    seen_shared = False
    while engine.has_unfinished():
        engine.step()
        if a.block_table and b.block_table:
            seen_shared |= a.block_table[:shared] == b.block_table[:shared]
    assert shared >= 1 and seen_shared
    assert b.num_cached_tokens == shared * 16
    assert a.output_token_ids != b.output_token_ids and len(a.output_token_ids) == MAX_TOKENS
    # choice 0 draws with the request's seed: the same as n=1
    assert a.output_token_ids == run(smollm2_engine(), [p], sampled(5))[0]


def test_temperature_zero_and_top_k_one_equal_hf_greedy(smol):
    tok, hf, prompts = smol
    engine = smollm2_engine()
    ps = prompts[:2]
    greedy = run(engine, ps, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    top1 = run(engine, ps, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=MAX_TOKENS,
                                          ignore_eos=True))
    assert greedy == top1
    for p, g in zip(ps, greedy):
        ref = hf_greedy(hf, p, MAX_TOKENS)
        assert g[:len(ref)] == ref


def test_greedy_repetition_penalty_equals_hf(smol):
    """HF's RepetitionPenaltyLogitsProcessor over prompt + output, greedy: the same tokens."""
    tok, hf, _ = smol
    p = chat_ids(tok, "Repeat the word 'cat' ten times.")
    (seq,), = smollm2_engine().generate([p], SamplingParams(temperature=0.0, max_tokens=16,
                                                            repetition_penalty=1.5))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          do_sample=False, max_new_tokens=16, repetition_penalty=1.5)[0, len(p):].tolist()
    assert seq.output_token_ids == ref
    assert ref != hf_greedy(hf, p, 16)          # the penalty changed the answer


def test_runner_penalty_inputs_count_outputs_and_see_prompt(smol):
    from engine.sequence import Sequence
    engine = smollm2_engine(num_kv_blocks=4)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.1, repetition_penalty=1.2)
    seq = Sequence(0, "r", 0, [5, 6], params, seed=1)
    for t in (7, 7, 5):
        seq.append_token(t, 0.0, None)
    m = engine.runner.sampling_metadata([seq])
    assert m.output_counts[0, [5, 6, 7, 8]].tolist() == [1.0, 0.0, 2.0, 0.0]
    assert m.seen_mask[0].nonzero().flatten().tolist() == [5, 6, 7]
    assert m.frequency_penalty.tolist() == [0.5] and m.repetition_penalty.tolist() == [pytest.approx(1.2)]


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_logprobs_are_the_models_raw_log_softmax(smol, temperature):
    tok, hf, prompts = smol
    params = SamplingParams(temperature=temperature, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5,
                            repetition_penalty=1.3 if temperature else 1.0)
    (seq,), = smollm2_engine().generate([prompts[2]], params)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([seq.token_ids])).logits[0].float().log_softmax(-1)
    for i, (tok_id, entry) in enumerate(zip(seq.output_token_ids, seq.top_logprobs)):
        lp = ref[seq.num_prompt_tokens + i - 1]
        assert abs(seq.logprobs[i] - lp[tok_id].item()) < 1e-4
        assert entry.token_id == tok_id and abs(entry.logprob - lp[tok_id].item()) < 1e-4
        vals = [v for _, v in entry.top]
        assert vals == sorted(vals, reverse=True) and len(vals) == 5
        assert all(abs(v - lp[t].item()) < 1e-4 for t, v in entry.top)
        assert math.isclose(vals[0], lp.max().item(), abs_tol=1e-4)
        if temperature == 0.0:
            assert entry.top[0][0] == tok_id
