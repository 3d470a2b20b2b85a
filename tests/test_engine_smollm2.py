"""Greedy output of the engine on the real SmolLM2-135M-Instruct (fp32, CPU) is token-identical to HF
`generate(do_sample=False)` run one prompt at a time, EOS included, however the engine schedules:
all at once, with arrivals during decode, with tiny prefill chunks, and under KV-cache preemption."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.helpers import SMOL_PROMPTS, chat_ids, hf_greedy, smollm2, smollm2_engine

MAX_TOKENS = 24
PROMPTS = SMOL_PROMPTS[:8]


@pytest.fixture(scope="module")
def reference():
    """(prompt token ids, HF greedy continuations), one HF generate per prompt (batch 1, no padding)."""
    _, tok, hf = smollm2()
    prompts = [chat_ids(tok, text) for text in PROMPTS]
    return prompts, [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=False)


def assert_same(prompts, refs, seqs) -> None:
    _, tok, _ = smollm2()
    for p, ref, seq in zip(prompts, refs, seqs):
        assert seq.prompt_token_ids == p
        assert seq.output_token_ids == ref, (
            f"prompt {tok.decode(p)[-40:]!r}\n engine: {tok.decode(seq.output_token_ids)!r}\n"
            f" hf:     {tok.decode(ref)!r}")
        eos = bool(ref) and ref[-1] == tok.eos_token_id
        assert seq.finish_reason == ("stop" if eos else "length")


def test_reference_is_meaningful(reference):
    """The prompts differ in length, some answers end in EOS before max_tokens and some run to it."""
    prompts, refs = reference
    _, tok, _ = smollm2()
    assert len(prompts) >= 8 and len({len(p) for p in prompts}) >= 6
    assert any(r[-1] == tok.eos_token_id and len(r) < MAX_TOKENS for r in refs)
    assert any(len(r) == MAX_TOKENS for r in refs)


def test_all_submitted_together(reference):
    prompts, refs = reference
    engine = smollm2_engine()
    out = engine.generate(prompts, params())
    assert_same(prompts, refs, [seqs[0] for seqs in out])
    assert engine.stats().num_preemptions == 0
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_requests_arrive_while_others_decode(reference):
    prompts, refs = reference
    engine = smollm2_engine()
    seqs = {}

    def add(indices):
        for i in indices:
            (seqs[i],) = engine.add_request(f"r{i}", prompts[i], params())

    add([0, 1, 2])
    for _ in range(4):
        engine.step()
    assert all(s.num_output_tokens >= 2 for s in seqs.values())      # decoding when the next arrive
    add([3, 4, 5])
    for _ in range(3):
        engine.step()
    add([6, 7])
    while engine.has_unfinished():
        engine.step()
    assert_same(prompts, refs, [seqs[i] for i in range(len(prompts))])


def test_tiny_prefill_chunks(reference):
    """16 tokens per step: every prompt is prefilled in several chunks, mixed with others' decodes."""
    prompts, refs = reference
    engine = smollm2_engine(max_num_batched_tokens=16)
    steps = 0
    seqs = [engine.add_request(f"c{i}", p, params())[0] for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert steps >= sum(len(p) for p in prompts) // 16
    assert_same(prompts, refs, seqs)


def test_tiny_kv_pool_forces_preemption(reference):
    """10 blocks of 16 tokens hold about two sequences: running ones are preempted and recomputed."""
    prompts, refs = reference
    engine = smollm2_engine(num_kv_blocks=10, block_size=16)
    out = engine.generate(prompts, params())
    seqs = [s[0] for s in out]
    assert engine.stats().num_preemptions > 0
    assert any(s.num_preemptions > 0 for s in seqs)
    assert_same(prompts, refs, seqs)
    assert engine.block_manager.num_free_blocks == 10
