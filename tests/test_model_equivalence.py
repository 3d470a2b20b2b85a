"""The engine's model computes HF transformers' logits (fp32, CPU, atol 1e-4) on tiny random models of
each supported family: full-prompt prefill, chunked prefill and decode through the paged KV cache,
mixed sequence lengths in one batch, and greedy logprobs through the public generate API."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.helpers import (TINY_CONFIGS, TINY_VOCAB, LogitRecorder, hf_logits, make_tiny_model,
                           tiny_engine)

ATOL = 1e-4
# mixed lengths in one batch; 90 + decode passes position 64 (llama3 rope's original context)
PROMPT_LENS = (1, 5, 17, 38, 90)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(request.param, path, seed=1234)
    return request.param, path, hf


def prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                          logprobs=logprobs)


def assert_rows_match_hf(rec: LogitRecorder, hf) -> None:
    """Every logits row the engine computed equals HF's logits at the same position."""
    refs: dict[int, torch.Tensor] = {}
    worst = 0.0
    for seq, pos, row in rec.rows:
        if id(seq) not in refs:
            refs[id(seq)] = hf_logits(hf, seq.token_ids)
        ref = refs[id(seq)][pos]
        err = (row - ref).abs().max().item()
        worst = max(worst, err)
        assert err < ATOL, f"seq of {seq.num_prompt_tokens} prompt tokens, position {pos}: max |diff| {err}"
    assert worst < ATOL


def test_configs_cover_the_families():
    """The parametrization covers each family, tied and untied heads, GQA ratios 1 and 4, llama3 rope."""
    from tests.helpers import tiny_hf_config
    cfgs = [tiny_hf_config(n) for n in TINY_CONFIGS]
    assert {c.model_type for c in cfgs} == {"llama", "qwen2", "mistral"}
    assert {bool(c.tie_word_embeddings) for c in cfgs} == {True, False}
    assert {1, 4} <= {c.num_attention_heads // c.num_key_value_heads for c in cfgs}
    assert any(c.rope_parameters.get("rope_type") == "llama3" for c in cfgs)
    assert any(c.model_type == "qwen2" and c.tie_word_embeddings
               and c.num_attention_heads // c.num_key_value_heads == 4 for c in cfgs)


def test_full_prompt_forward(tiny):
    """One step prefills every prompt at once: all positions of all prompts match HF."""
    name, path, hf = tiny
    engine = tiny_engine(path, block_size=16, max_num_batched_tokens=1024)
    rec = LogitRecorder(engine)
    ps = prompts(1)
    engine.generate(ps, greedy(max_tokens=1))
    assert rec.num_steps == 1
    covered = {(seq.num_prompt_tokens, pos) for seq, pos, _ in rec.rows}
    assert covered == {(len(p), i) for p in ps for i in range(len(p))}
    assert_rows_match_hf(rec, hf)


def test_chunked_prefill_and_decode_through_paged_cache(tiny):
    """A 7-token budget with 4-token blocks: prompts arrive in chunks that straddle block edges, and
    decode steps of finished prefills share steps with other prompts' chunks."""
    name, path, hf = tiny
    engine = tiny_engine(path, block_size=4, max_num_batched_tokens=7, num_kv_blocks=80)
    rec = LogitRecorder(engine)
    out = engine.generate(prompts(2), greedy(max_tokens=6))
    assert all(len(seqs[0].output_token_ids) == 6 for seqs in out)
    # the 90-token prompt took many chunks; decode rows (positions past the prompt) were computed
    longest = max((s[0] for s in out), key=lambda s: s.num_prompt_tokens)
    assert sum(1 for seq, pos, _ in rec.rows if seq is longest and pos < seq.num_prompt_tokens) == 90
    assert rec.num_steps > 90 // 7
    decode_rows = [(seq, pos) for seq, pos, _ in rec.rows if pos >= seq.num_prompt_tokens]
    assert len(decode_rows) == 5 * len(PROMPT_LENS)      # the 6th token is sampled, never fed back
    assert_rows_match_hf(rec, hf)


def test_greedy_generate_logprobs_match_hf_log_softmax(tiny):
    """Through the public API: greedy tokens are HF's argmax, logprobs and top logprobs are HF's."""
    name, path, hf = tiny
    engine = tiny_engine(path, block_size=4, max_num_batched_tokens=16, num_kv_blocks=80)
    out = engine.generate(prompts(3), greedy(max_tokens=8, logprobs=5))
    for (seq,) in out:
        ref = hf_logits(hf, seq.token_ids).log_softmax(-1)
        assert len(seq.top_logprobs) == 8
        for i, (tok, entry) in enumerate(zip(seq.output_token_ids, seq.top_logprobs)):
            lp = ref[seq.num_prompt_tokens + i - 1]
            assert lp[tok] >= lp.max() - ATOL, f"token {i} is not HF's argmax"
            assert abs(seq.logprobs[i] - lp[tok].item()) < ATOL
            assert entry.token_id == tok and abs(entry.logprob - lp[tok].item()) < ATOL
            ids = [t for t, _ in entry.top]
            vals = [v for _, v in entry.top]
            assert len(ids) == 5 and len(set(ids)) == 5
            for t, v in entry.top:
                assert abs(v - lp[t].item()) < ATOL
            assert vals == sorted(vals, reverse=True)
            assert vals[-1] >= lp.topk(5).values[-1].item() - ATOL    # they are the top 5


def test_batched_equals_alone(tiny):
    """A prompt's logits do not depend on what else shares its steps."""
    name, path, hf = tiny
    ps = prompts(4)
    together = tiny_engine(path, block_size=4, max_num_batched_tokens=32)
    rec_together = LogitRecorder(together)
    out = together.generate(ps, greedy(max_tokens=4))
    for idx in (0, 4):
        alone = tiny_engine(path, block_size=4, max_num_batched_tokens=32)
        rec_alone = LogitRecorder(alone)
        (seq,), = alone.generate([ps[idx]], greedy(max_tokens=4))
        assert seq.output_token_ids == out[idx][0].output_token_ids
        mine = {pos: row for s, pos, row in rec_together.rows if s is out[idx][0]}
        for s, pos, row in rec_alone.rows:
            assert (row - mine[pos]).abs().max().item() < ATOL


def test_generation_config_eos_ids_stop_like_hf_generate(tmp_path):
    """HF generate stops on generation_config.json's eos ids (a list in Llama 3 chat checkpoints);
    the engine must stop on the same tokens."""
    import json
    from transformers import AutoModelForCausalLM
    make_tiny_model("llama-untied-gqa1", tmp_path, seed=7)
    prompt = prompts(5)[3]
    (free,), = tiny_engine(tmp_path).generate([prompt], greedy(max_tokens=10))
    out = free.output_token_ids
    k = next(i for i in range(2, 10) if out[i] not in out[:i] and out[i] != 2)
    gen_path = tmp_path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen["eos_token_id"] = [2, out[k]]
    gen_path.write_text(json.dumps(gen))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=10)[0, len(prompt):].tolist()
    assert ref == out[:k + 1]
    params = SamplingParams(temperature=0.0, max_tokens=10, detokenize=False)
    (seq,), = tiny_engine(tmp_path).generate([prompt], params)
    assert seq.output_token_ids == ref and seq.finish_reason == "stop"
