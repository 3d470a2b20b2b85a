"""Overlapped scheduling (`engine.overlap_scheduling`, engine/overlap.py) keeps every output of today's
synchronous engine: the same workloads run through an engine with the flag off and one with it on give
the same tokens, logprobs, texts and finish reasons (greedy and seeded sampling), with requests arriving
while others decode, chunked prefill, EOS / stop-token / stop-string / length finishes, an abort mid-decode,
preemption, prefix-cache hits, n > 1, activation capture (the same pool rows) and an adapter version
going live mid-decode. float64 engines: their logprobs are bit-identical although a finished sequence's
extra token changes a step's batch (float32: equal to 1e-5, tokens identical)."""
from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import PLACEHOLDER, Sequence
from engine.setup import build_activation_pool, build_engine_parts
from tests.helpers import make_tiny_model


class CharTokenizer:
    """One letter per token: stop strings can be matched across token boundaries."""
    eos_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-untied-gqa1")
    make_tiny_model("llama-untied-gqa1", path, seed=11)
    return path


def build(path, overlap: bool, **overrides) -> LLMEngine:
    from transformers import AutoConfig
    values = dict(model=str(path), device="cpu", dtype="float64", num_kv_blocks=64, block_size=4,
                  capture="none", activation_pool_bytes=8 << 20, overlap_scheduling=overlap)
    values.update(overrides)
    config = EngineConfig(**values)
    parts = build_engine_parts(config, hf_config=AutoConfig.from_pretrained(str(path)), tokenizer=CharTokenizer())
    return LLMEngine(config, parts, build_activation_pool(config, parts))


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def drive(engine: LLMEngine, arrivals: dict, abort: tuple[str, int] | None = None, on_step=None) -> dict:
    """Run `arrivals` (step number -> [(request id, prompt, params)]) to completion; `abort`: (request id,
    k) aborts that request once k tokens of it came out. Returns what the deltas said, per choice."""
    out: dict = {}
    seqs = []
    step = 0
    while engine.has_unfinished() or any(k >= step for k in arrivals):
        for rid, p, params in arrivals.get(step, []):
            seqs += engine.add_request(rid, p, params)
        if on_step is not None:
            on_step(engine, step)
        for d in engine.step():
            o = out.setdefault((d.request_id, d.index), dict(ids=[], text="", lps=[], finish=None, stop=None))
            assert PLACEHOLDER not in d.token_ids and o["finish"] is None
            o["ids"] += d.token_ids
            o["text"] += d.text
            o["lps"] += [(t.token_id, t.logprob, t.top) for t in d.logprobs]
            o["finish"], o["stop"] = d.finish_reason, d.stop_reason
        if abort is not None and len(out.get((abort[0], 0), {}).get("ids", [])) >= abort[1]:
            engine.abort_request(abort[0])
            abort = None
        step += 1
        assert step < 500
    for seq in seqs:                                # the sequences hold exactly what was emitted
        o = out.get((seq.request_id, seq.index), dict(ids=[]))
        assert seq.output_token_ids == o["ids"] and len(seq.logprobs) == len(o["ids"])
        o["logprobs"], o["versions"] = seq.logprobs, seq.adapter_versions
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished()
    return out


def run_both(path, arrivals, abort=None, on_step=None, **overrides):
    off = build(path, False, **overrides)
    on = build(path, True, **overrides)
    a = drive(off, arrivals, abort, on_step)
    b = drive(on, arrivals, abort, on_step)
    assert a == b
    return a, off, on


def mixed_arrivals() -> dict:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3)
    return {
        0: [("a", prompt(1, 5), greedy),
            ("b", prompt(2, 9), SamplingParams(temperature=0.8, seed=3, max_tokens=7)),
            ("c", prompt(3, 17), SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=5, max_tokens=10,
                                                logprobs=0))],
        2: [("d", prompt(4, 30), SamplingParams(temperature=0.7, min_p=0.05, seed=8, max_tokens=9)),
            ("e", prompt(5, 3), SamplingParams(temperature=0.0, max_tokens=4))],
        5: [("f", prompt(6, 11), SamplingParams(n=2, temperature=0.9, seed=13, max_tokens=6, logprobs=2))],
        7: [("g", prompt(7, 6), SamplingParams(temperature=0.0, max_tokens=3, repetition_penalty=1.3,
                                               presence_penalty=0.5))],
    }


@pytest.fixture
def filled(monkeypatch):
    """Counts decode rows whose input token came from the step in flight, on the device."""
    import engine.inflight as inflight
    import engine.model_runner as model_runner
    counts = []
    original = inflight.fill_unresolved_inputs

    def fill(input_ids, batch, prev):
        counts.append(sum(s.token_ids[s.num_computed_tokens + n - 1] == PLACEHOLDER
                          for s, n in zip(batch.seqs, batch.num_new_tokens)))
        original(input_ids, batch, prev)
    monkeypatch.setattr(model_runner, "fill_unresolved_inputs", fill)
    return counts


def test_mixed_arrivals_greedy_and_seeded(tiny, filled):
    """Arrivals while others decode, a 30-token prompt in chunks, n=2, penalties, top-k/p, min-p."""
    out, _, on = run_both(tiny, mixed_arrivals(), max_num_batched_tokens=16)
    assert len(out) == 8 and all(o["finish"] == "length" for o in out.values())
    assert on.runner.num_host_syncs > 0 and sum(filled) > 20      # decode inputs taken on the device


def same_but_float32_logprobs(a: dict, b: dict) -> bool:
    """Everything equal but logprobs, which are equal to 1e-5 (a float32 batch of other rows rounds
    differently)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["logprobs"] == pytest.approx(b[key]["logprobs"], abs=1e-5)
        assert [t for t, _, _ in a[key]["lps"]] == [t for t, _, _ in b[key]["lps"]]
        assert [lp for _, lp, _ in a[key]["lps"]] == pytest.approx([lp for _, lp, _ in b[key]["lps"]], abs=1e-5)
        for (_, _, x), (_, _, y) in zip(a[key]["lps"], b[key]["lps"]):
            assert [i for i, _ in x] == [i for i, _ in y]
            assert [v for _, v in x] == pytest.approx([v for _, v in y], abs=1e-5)
        rest = {k: v for k, v in a[key].items() if k not in ("logprobs", "lps")}
        assert rest == {k: v for k, v in b[key].items() if k not in ("logprobs", "lps")}
    return True


def test_float32_tokens_identical_logprobs_close(tiny):
    off = drive(build(tiny, False, dtype="float32"), mixed_arrivals())
    on = drive(build(tiny, True, dtype="float32"), mixed_arrivals())
    assert same_but_float32_logprobs(off, on)


def test_eos_stop_token_and_stop_string_finishes(tiny, monkeypatch):
    """Ends discovered a step late: the token computed after the end is never emitted."""
    ref = drive(build(tiny, False), {0: [("r", prompt(21, 7), SamplingParams(temperature=0.0, max_tokens=12))]})
    ids, text = ref[("r", 0)]["ids"], ref[("r", 0)]["text"]
    eos, stop_id = ids[5], ids[3]
    stop_str = text[2:4]                            # before the EOS at 5
    greedy = dict(temperature=0.0, max_tokens=12)
    arrivals = {0: [("eos", prompt(21, 7), SamplingParams(**greedy)),
                    ("stop-id", prompt(21, 7), SamplingParams(stop_token_ids=[stop_id], **greedy)),
                    ("stop-str", prompt(21, 7), SamplingParams(stop=[stop_str], **greedy)),
                    ("long", prompt(22, 5), SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))]}

    def set_eos(engine, step):
        engine.scheduler.eos_token_ids = {eos}
    dropped = []
    original = Sequence.drop_unresolved

    def drop(seq):
        dropped.append(seq.has_unresolved)
        original(seq)
    monkeypatch.setattr(Sequence, "drop_unresolved", drop)
    out, _, _ = run_both(tiny, arrivals, on_step=set_eos, enable_prefix_caching=False)
    assert any(dropped)                 # an end found a step late: the extra token was computed, dropped
    assert out[("eos", 0)]["finish"] == "stop" and out[("eos", 0)]["ids"][-1] == eos
    assert out[("stop-id", 0)]["stop"] == stop_id and len(out[("stop-id", 0)]["ids"]) <= 4
    assert out[("stop-str", 0)]["stop"] == stop_str and stop_str not in out[("stop-str", 0)]["text"]


def test_abort_mid_decode(tiny):
    arrivals = {0: [("x", prompt(31, 6), SamplingParams(temperature=0.0, max_tokens=20)),
                    ("y", prompt(32, 9), SamplingParams(temperature=0.9, seed=4, max_tokens=15))],
                3: [("z", prompt(33, 4), SamplingParams(temperature=0.0, max_tokens=10))]}
    out, off, on = run_both(tiny, arrivals, abort=("x", 4))
    assert len(out[("x", 0)]["ids"]) == 4 and out[("x", 0)]["finish"] is None
    assert len(out[("y", 0)]["ids"]) == 15


def test_preemption_with_a_small_kv_cache(tiny):
    arrivals = {0: [(f"p{i}", prompt(40 + i, 6 + i), SamplingParams(temperature=0.0 if i % 2 else 0.8,
                                                                     seed=i, max_tokens=14))
                    for i in range(4)]}
    _, off, on = run_both(tiny, arrivals, num_kv_blocks=10)
    assert off.stats().num_preemptions > 0 and on.stats().num_preemptions > 0


def test_prefix_cache_hits(tiny):
    shared = prompt(50, 16)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    arrivals = {0: [("s0", shared + prompt(51, 3), params),
                    ("s1", shared + prompt(52, 5), SamplingParams(n=2, temperature=0.8, seed=9, max_tokens=5))],
                20: [("s2", shared + prompt(53, 2), params), ("s3", shared + prompt(51, 3), params)]}
    _, off, on = run_both(tiny, arrivals)
    assert off.stats().prefix_cache_hits > 0
    assert on.stats().prefix_cache_hits == off.stats().prefix_cache_hits


def pool_rows(engine: LLMEngine, keys) -> dict:
    pool, layout = engine.activation_pool, engine.activation_pool.layout
    rows = {}
    for key in keys:
        record = pool.get(key)
        if record is None:
            continue
        rows[key] = (record.offset, record.captured, list(record.versions),
                     [pool.gather(key, layer, kind) for layer in range(layout.num_layers) for kind in layout.dims])
    return rows


def test_capture_records_the_same_rows(tiny):
    arrivals = mixed_arrivals()
    arrivals[9] = [("h", prompt(6, 11) + prompt(60, 4), SamplingParams(temperature=0.0, max_tokens=5))]
    out, off, on = run_both(tiny, arrivals, capture="prefill", max_num_batched_tokens=16)
    a, b = pool_rows(off, out), pool_rows(on, out)
    assert a.keys() == b.keys() and len(a) >= 8
    for key in a:
        assert a[key][:3] == b[key][:3]
        assert all(torch.equal(x, y) for x, y in zip(a[key][3], b[key][3]))


def test_adapter_version_goes_live_mid_decode(tiny):
    from trainer.adapters import AdapterManager
    from trainer.lora import LoRAConfig

    def offer(engine, step):
        if step == 0:
            engine._manager = AdapterManager(engine.runner.model, LoRAConfig(rank=4, alpha=8))
        if step == 4:
            gen = torch.Generator().manual_seed(1)
            masters = {name: (torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5,
                              torch.randn(b.shape, generator=gen) / b.shape[1] ** 0.5)
                       for name, (a, b) in engine._manager.masters().items()}
            engine.offer_adapter(engine._manager.stage(masters, version=1))
    ref = drive(build(tiny, False), {0: [("t", prompt(74, 6), SamplingParams(temperature=0.0, max_tokens=8))]})
    last = ref[("t", 0)]["ids"][3]              # t's 4th token, sampled by the step before the switch
    assert last not in ref[("t", 0)]["ids"][:3]
    arrivals = {0: [("v", prompt(70, 5), SamplingParams(temperature=0.0, max_tokens=10)),
                    ("w", prompt(71, 8), SamplingParams(temperature=0.8, seed=2, max_tokens=10)),
                    ("t", prompt(74, 6), SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[last]))],
                6: [("u", prompt(72, 6), SamplingParams(temperature=0.0, max_tokens=4))]}
    out, _, _ = run_both(tiny, arrivals, on_step=offer, enable_prefix_caching=False)
    assert out[("v", 0)]["versions"][-1][1] == 1 and len(out[("v", 0)]["versions"]) == 2
    assert out[("u", 0)]["versions"] == [(0, 1)]
    assert out[("t", 0)]["versions"] == [(0, 0)] and len(out[("t", 0)]["ids"]) == 4


def test_at_most_one_host_sync_per_step(tiny, monkeypatch):
    """Counted where the host could wait for the device: reading a tensor's values."""
    engine = build(tiny, True)
    for rid, p, params in mixed_arrivals()[0]:
        engine.add_request(rid, p, params)
    reads = []
    for name in ("tolist", "item", "__bool__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    observed = []
    engine.step_signal.observe(lambda *args: observed.append(args))
    steps = 0
    while engine.has_unfinished():
        reads.clear()
        syncs = engine.runner.num_host_syncs
        engine.step()
        assert engine.runner.num_host_syncs - syncs <= 1 and len(reads) <= 1, reads
        steps += 1
    assert steps > 5
    assert len(observed) == engine.runner.num_host_syncs          # one step signal per step launched
    assert engine.step_signal.prefill_tokens == 0


def test_bad_configs_are_rejected():
    with pytest.raises(ConfigError, match="capture=prefill"):
        EngineConfig(overlap_scheduling=True, capture="prefill+decode")
    with pytest.raises(ConfigError, match="true or false"):
        EngineConfig(overlap_scheduling="yes")
    assert EngineConfig(overlap_scheduling=True, capture="prefill").overlap_scheduling
    assert EngineConfig.from_dict({"overlap_scheduling": True}).overlap_scheduling


def test_async_engine_streams_the_same_outputs(tiny):
    """The engine thread steps an overlapped engine: every request streams what a synchronous engine
    gives it, and a request cancelled mid-stream leaves no sequence or block behind."""
    import asyncio
    from engine.async_engine import AsyncEngine
    requests = [(f"q{i}", prompt(80 + i, 4 + 3 * i), SamplingParams(temperature=0.0 if i % 2 else 0.9,
                                                                      seed=i, max_tokens=6 + i))
                for i in range(4)]
    ref = drive(build(tiny, False), {0: requests})

    async def collect(engine, rid, p, params, cancel_after=None):
        ids = []
        async for delta in engine.generate(rid, p, params):
            ids += delta.token_ids
            if cancel_after is not None and len(ids) >= cancel_after:
                break
        return ids

    async def main():
        engine = AsyncEngine(build(tiny, True))
        engine.start()
        try:
            long = SamplingParams(temperature=0.0, max_tokens=40)
            outs = await asyncio.gather(*[collect(engine, *r) for r in requests],
                                        collect(engine, "cancelled", prompt(90, 5), long, cancel_after=3))
            for _ in range(200):
                if not engine.engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            return outs, engine.engine
        finally:
            engine.shutdown()
    outs, llm = asyncio.run(main())
    assert outs[:4] == [ref[(rid, 0)]["ids"] for rid, _, _ in requests]
    assert len(outs[4]) == 3 and not llm.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_smollm2_texts_and_stop_strings(tmp_path):
    """The real SmolLM2 and its tokenizer (fp32, capture=prefill): the same texts, tokens and finishes,
    with a stop string cut from the synchronous answer, arrivals during decode and preemption."""
    from tests.helpers import SMOL_PROMPTS, chat_ids, smollm2, smollm2_engine
    _, tok, _ = smollm2()
    prompts = [chat_ids(tok, text) for text in SMOL_PROMPTS[:6]]
    greedy = dict(temperature=0.0, max_tokens=20)
    first = drive(smollm2_engine(num_kv_blocks=12), {0: [("s", prompts[1], SamplingParams(**greedy))]})
    stop = first[("s", 0)]["text"][6:10]
    arrivals = {0: [(f"r{i}", p, SamplingParams(**greedy)) for i, p in enumerate(prompts[:3])],
                3: [("stop", prompts[1], SamplingParams(stop=[stop], **greedy))]
                + [(f"r{i}", p, SamplingParams(temperature=0.8, seed=i, max_tokens=20))
                   for i, p in enumerate(prompts[3:], start=3)]}
    off, on = smollm2_engine(num_kv_blocks=12), smollm2_engine(num_kv_blocks=12, overlap_scheduling=True)
    a, b = drive(off, arrivals), drive(on, arrivals)
    assert same_but_float32_logprobs(a, b) and a[("stop", 0)]["stop"] == stop
    assert on.stats().num_preemptions > 0
