"""Model-free scheduler tests: a fake runner samples where `batch.samples(i)` and simulates the KV cache."""
import itertools
import random

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import SampleResult, Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus

EOS = 0
_ids = itertools.count()


def make(num_blocks=64, bs=4, max_seqs=8, budget=64, max_len=256, prefix=True):
    bm = BlockManager(num_blocks, bs, prefix)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), bm, {EOS}), bm


def add(sched, prompt, rid=None, n=1, adapter_version=0, **kw):
    params = SamplingParams(n=n, **kw)
    rid = rid if rid is not None else f"r{next(_ids)}"
    seqs = []
    for i in range(n):
        seqs.append(Sequence(next(_ids), rid, i, list(prompt), params, seed=i,
                             adapter_version=adapter_version, prefix_parent=seqs[0] if seqs else None))
        sched.add(seqs[-1])
    return seqs if n > 1 else seqs[0]


class FakeRunner:
    """Writes a fingerprint of each computed position into a simulated KV cache, checks every position
    it attends to, and samples `token_fn(seq)` where the batch samples."""

    def __init__(self, token_fn=None):
        self.kv = {}
        self.token_fn = token_fn or (lambda s: 1000 + s.num_output_tokens)

    def __call__(self, sched, batch):
        bs = sched.block_manager.block_size
        results = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            assert n >= 1 and seq.status == SequenceStatus.RUNNING
            end = seq.num_computed_tokens + n
            assert len(seq.block_table) >= -(-end // bs)
            slot = lambda p: seq.block_table[p // bs] * bs + p % bs
            for p in range(seq.num_computed_tokens, end):
                fp = (seq.adapter_version, tuple(seq.token_ids[:p + 1]))
                block = sched.block_manager.blocks[seq.block_table[p // bs]]
                assert block.ref_count == 1 or self.kv.get(slot(p)) == fp, "write into a shared block"
                self.kv[slot(p)] = fp
            for p in range(end):                               # attention reads
                assert self.kv.get(slot(p)) == (seq.adapter_version, tuple(seq.token_ids[:p + 1])), (seq, p)
            results.append(SampleResult(self.token_fn(seq), -0.5) if batch.samples(i) else None)
        return results


def step(sched, runner):
    batch = sched.schedule()
    cfg = sched.config
    assert batch.num_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
    assert not {id(s) for s in batch.preempted} & {id(s) for s in batch.seqs}, "preempted and run"
    sched.postprocess(batch, runner(sched, batch))
    check_invariants(sched)
    return batch


def check_invariants(sched):
    bm = sched.block_manager
    live = [s for s in sched.running]
    refs = {}
    for s in live:
        for b in s.block_table:
            refs[b] = refs.get(b, 0) + 1
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed_tokens == 0 and s.status == SequenceStatus.WAITING
    assert all(b.ref_count == refs.get(b.block_id, 0) for b in bm.blocks)
    assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    for s in live:
        assert s.status == SequenceStatus.RUNNING and s.num_computed_tokens < s.num_tokens
        for i, b in enumerate(s.block_table):
            if refs[b] > 1:                                    # shared: a registered, full, computed block
                blk = bm.blocks[b]
                assert blk.hash is not None and bm.hash_to_block_id.get(blk.hash) == b
                assert blk.token_ids == tuple(s.block_tokens(i, bm.block_size))
                assert (i + 1) * bm.block_size <= s.num_computed_tokens


def run_all(sched, runner, max_steps=1000):
    batches = []
    while sched.has_unfinished():
        batches.append(step(sched, runner))
        assert len(batches) < max_steps
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return batches


def test_chunked_prefill_boundaries_and_sampling():
    sched, bm = make(budget=16)
    s = add(sched, range(1, 51), max_tokens=3)
    runner, chunks = FakeRunner(), []
    for _ in range(4):
        b = sched.schedule()
        chunks.append((b.num_new_tokens[0], b.samples(0)))
        sched.postprocess(b, runner(sched, b))
    assert chunks == [(16, False), (16, False), (16, False), (2, True)]
    assert s.num_output_tokens == 1
    run_all(sched, runner)
    assert s.output_token_ids == [1000, 1001, 1002] and s.finish_reason == "length"


def test_continuous_batching_decodes_first_and_limits():
    sched, bm = make(budget=10, max_seqs=2)
    runner = FakeRunner()
    a = add(sched, range(1, 5), max_tokens=20)
    step(sched, runner)
    b, c = add(sched, range(1, 30), max_tokens=2), add(sched, range(1, 3), max_tokens=2)
    batch = step(sched, runner)                 # a decodes while b is admitted with a chunk
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 9]
    assert c.status == SequenceStatus.WAITING   # max_num_seqs = 2
    batch = step(sched, runner)
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 9]   # decode before prefill chunk
    run_all(sched, runner)
    assert [s.num_output_tokens for s in (a, b, c)] == [20, 2, 2]


def test_preemption_by_recompute_and_resume():
    sched, bm = make(num_blocks=6, bs=4, budget=64)
    runner = FakeRunner()
    a = add(sched, range(1, 9), max_tokens=12)                # 8 + 12 tokens -> 5 blocks
    b = add(sched, range(11, 19), max_tokens=12)
    step(sched, runner)
    assert sched.running == [a, b] and bm.num_free_blocks == 2
    for _ in range(20):
        batch = step(sched, runner)
        if sched.num_preemptions:
            break
    assert batch.preempted == [b] and b not in batch.seqs
    assert b.status == SequenceStatus.WAITING and sched.waiting[0] is b
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert a.num_preemptions == 0 and a.block_table
    out_before = b.num_output_tokens
    run_all(sched, runner)
    assert a.num_output_tokens == b.num_output_tokens == 12 and out_before > 0
    assert b.output_token_ids == [1000 + i for i in range(12)]
    assert a.finish_reason == b.finish_reason == "length"


def test_preemption_victim_is_newest_not_yet_scheduled():
    """A decode of the newest sequence is already in the batch: the victim is then the newest sequence
    not yet scheduled (y), not the older prefill (x) that asks for blocks."""
    sched, bm = make(num_blocks=4, bs=4)
    x, y, z = add(sched, range(1, 13)), add(sched, range(21, 33)), add(sched, [5, 6, 7])
    sched.waiting.clear()
    for s, computed in ((x, 4), (y, 4), (z, 3)):
        bm.allocate(s, computed)
        s.num_computed_tokens, s.status = computed, SequenceStatus.RUNNING
        sched.running.append(s)
    z.append_token(9, -0.1, None)                       # z decodes (1 uncomputed token)
    batch = sched.schedule()
    assert batch.seqs == [z, x] and batch.num_new_tokens == [1, 8]
    assert batch.preempted == [y] and list(sched.waiting) == [y]
    assert x.num_preemptions == 0 and y.num_preemptions == 1
    sched.postprocess(batch, [SampleResult(1, 0.0), SampleResult(2, 0.0)])
    check_invariants(sched)


def test_abort_waiting_prefill_and_decode_frees_blocks():
    sched, bm = make(num_blocks=32, budget=8)
    runner = FakeRunner()
    d = add(sched, range(1, 4), rid="dec", max_tokens=50)
    step(sched, runner); step(sched, runner)
    p = add(sched, range(1, 40), rid="pre", max_tokens=5)
    w = add(sched, range(1, 10), rid="wait")
    step(sched, runner)
    assert d.num_output_tokens >= 2 and 0 < p.num_computed_tokens < p.num_prompt_tokens
    assert w.status == SequenceStatus.WAITING
    for rid, seq in (("wait", w), ("pre", p), ("dec", d)):
        assert sched.abort(rid) == [seq]
        assert seq.finish_reason == "abort" and seq.block_table == [] and seq.is_finished
        check_invariants(sched)
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished()
    assert sched.abort("dec") == []


def test_abort_between_schedule_and_postprocess():
    sched, bm = make(budget=8)
    runner = FakeRunner()
    s = add(sched, range(1, 20), rid="x")
    batch = sched.schedule()
    results = runner(sched, batch)
    sched.abort("x")
    sched.postprocess(batch, results)
    assert s.num_computed_tokens == 0 and bm.num_free_blocks == bm.num_blocks


def test_finish_reasons():
    sched, _ = make(max_len=20)
    runner = FakeRunner(lambda s: {3: EOS, 4: 7}.get(s.num_output_tokens, 50))
    eos = add(sched, [1, 2], max_tokens=10)
    ign = add(sched, [1, 2], max_tokens=6, ignore_eos=True)
    stop_id = add(sched, [1, 2], max_tokens=10, ignore_eos=True, stop_token_ids=[7])
    exact = add(sched, [1, 2], max_tokens=3)
    model_len = add(sched, range(1, 18), max_tokens=None, ignore_eos=True)
    run_all(sched, runner)
    assert (eos.finish_reason, eos.num_output_tokens, eos.output_token_ids[-1]) == ("stop", 4, EOS)
    assert (ign.finish_reason, ign.num_output_tokens) == ("length", 6)
    assert (stop_id.finish_reason, stop_id.stop_reason, stop_id.num_output_tokens) == ("stop", 7, 5)
    assert (exact.finish_reason, exact.num_output_tokens) == ("length", 3)
    assert (model_len.finish_reason, model_len.num_tokens) == ("length", 20)


def test_n_siblings_wait_for_parent_then_share_prefix():
    sched, bm = make(budget=8, bs=4)
    runner = FakeRunner()
    parent, child = add(sched, range(1, 22), n=2, max_tokens=4)
    b = step(sched, runner)
    assert b.seqs == [parent] and child.status == SequenceStatus.WAITING
    while parent.num_computed_tokens < parent.num_prompt_tokens:
        b = step(sched, runner)
        assert child not in b.seqs
    b = step(sched, runner)
    assert child in b.seqs and child.num_cached_tokens == 20
    assert child.block_table[:5] == parent.block_table[:5]
    assert all(bm.blocks[x].ref_count == 2 for x in parent.block_table[:5])
    run_all(sched, runner)
    assert parent.num_output_tokens == child.num_output_tokens == 4


def test_prefix_cache_respects_adapter_version():
    sched, bm = make(budget=64)
    runner = FakeRunner()
    a = add(sched, range(1, 14), max_tokens=1)
    run_all(sched, runner)
    hit = add(sched, range(1, 14), max_tokens=1)
    miss = add(sched, range(1, 14), max_tokens=1, adapter_version=1)
    step(sched, runner)
    assert (a.num_cached_tokens, hit.num_cached_tokens, miss.num_cached_tokens) == (0, 12, 0)
    run_all(sched, runner)


def test_blocked_admission_counts_prefix_lookup_once():
    sched, bm = make(num_blocks=6, bs=4, max_len=64)
    runner = FakeRunner()
    add(sched, range(1, 10), max_tokens=1)
    run_all(sched, runner)                                                  # caches 2 blocks of 1..8
    hog = add(sched, range(50, 62), max_tokens=4)                           # 4 blocks: 2 left, both cached
    step(sched, runner)
    late = add(sched, range(1, 10), max_tokens=1)
    queries, hits = bm.prefix_queries, bm.prefix_hits
    for _ in range(3):
        step(sched, runner)
        assert late.status == SequenceStatus.WAITING
    assert (bm.prefix_queries, bm.prefix_hits) == (queries, hits)          # blocked lookups not counted
    run_all(sched, runner)
    assert (bm.prefix_queries - queries, bm.prefix_hits - hits) == (9, 8) and late.num_cached_tokens == 8
    assert hog.num_preemptions == 0


def test_randomized_stress_invariants():
    rng = random.Random(1234)
    sched, bm = make(num_blocks=16, bs=4, max_seqs=4, budget=16, max_len=64)
    runner = FakeRunner(lambda s: EOS if rng.random() < 0.03 else rng.randrange(1, 5))
    prefixes = [[rng.randrange(1, 5) for _ in range(12)] for _ in range(3)]
    requests, step_no = {}, 0
    while step_no < 400 or sched.has_unfinished():
        if step_no < 400 and rng.random() < 0.3:
            plen = rng.randrange(1, 41)
            prompt = (rng.choice(prefixes) + [rng.randrange(1, 5) for _ in range(40)])[:plen]
            rid = f"s{step_no}"
            seqs = add(sched, prompt, rid=rid, n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randrange(1, 21),
                       adapter_version=rng.choice([0, 0, 1]))
            requests[rid] = seqs if isinstance(seqs, list) else [seqs]
        if step_no < 400 and requests and rng.random() < 0.05:
            sched.abort(rng.choice(sorted(requests)))
            check_invariants(sched)
        step(sched, runner)
        step_no += 1
        assert step_no < 3000, "no progress"
    assert bm.num_free_blocks == bm.num_blocks
    assert sched.num_preemptions > 0 and bm.prefix_hits > 0
    for seqs in requests.values():
        for s in seqs:
            assert s.is_finished and s.block_table == []
            assert s.num_output_tokens <= s.params.max_tokens and s.num_tokens <= 64
            if s.finish_reason == "length":
                assert s.num_output_tokens == s.params.max_tokens or s.num_tokens == 64
            elif s.finish_reason == "stop":
                assert s.output_token_ids[-1] == EOS
