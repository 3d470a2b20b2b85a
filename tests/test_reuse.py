"""Issue 4: reuse of captured activations gives the gradients of recomputation (DESIGN §2)."""
import pytest
import torch

from tests.helpers import pack_bases
from trainer.check_grad import run_check


def _assert_exact_reuse(res, fp32_tensor_tol=1e-5):
    assert res["outcomes"] == {"hit": res["records"]}, res
    assert res["reused_rows"] > 0
    assert abs(res["loss_reuse"] - res["loss_recompute"]) < 1e-6, res
    assert res["max_rel_err"] < fp32_tensor_tol, res
    assert res["cosine"] > 1 - 1e-9


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("capture", ["prefill", "prefill+decode"])
def test_reuse_matches_recompute_tiny(model, capture):
    res = run_check(model, capture)
    _assert_exact_reuse(res)
    if capture == "prefill+decode":
        assert res["computed_rows"] == 0          # every input row came from the pool: no forward matmul
    else:
        assert res["computed_rows"] > 0           # response rows were multiplied


@pytest.mark.parametrize("capture", ["prefill", "prefill+decode"])
def test_reuse_matches_recompute_smollm2(capture):
    """fp32: losses within 1e-6 and the whole LoRA gradient within 1e-5 relative. Each LoRA tensor
    is within ~1.2e-5: float32 GEMMs round differently for the serving chunk shapes than for the
    training batch; in float64 (below) the two paths agree to the last bit."""
    res = run_check("smollm2", capture)
    assert res["outcomes"] == {"hit": res["records"]} and res["reused_rows"] > 0
    assert abs(res["loss_reuse"] - res["loss_recompute"]) < 1e-6, res
    assert res["rel_err"] < 1e-5, res
    assert res["max_rel_err"] < 5e-5, res
    exact = run_check("smollm2", capture, dtype="float64")
    assert exact["outcomes"] == {"hit": exact["records"]} and exact["reused_rows"] > 0
    assert exact["max_rel_err"] < 1e-12, exact


def test_stale_adapter_within_max_staleness_is_reused_and_counted():
    res = run_check("tiny-llama", staleness=1, max_staleness=1)
    assert res["outcomes"] == {"stale": res["records"]}
    assert res["reused_rows"] > 0
    assert res["max_rel_err"] > 1e-4                # the hybrid gradient differs from recompute's


def test_too_stale_adapter_falls_back_to_recompute():
    res = run_check("tiny-llama", staleness=2, max_staleness=1)
    assert res["outcomes"] == {"too_stale": res["records"]}
    assert res["reused_rows"] == 0
    assert res["max_rel_err"] == 0.0 and res["loss_reuse"] == res["loss_recompute"]


def test_pool_budget_and_eviction_fall_back_to_recompute():
    budget = 20 * 4096 * 2                     # tiny-llama: 4 KiB per token in fp32; room for ~2 blocks
    res = run_check("tiny-llama", pool_bytes=budget)
    assert res["pool"]["bytes"]["device"] <= budget
    assert res["outcomes"].get("evicted", 0) > 0 and res["outcomes"].get("hit", 0) > 0, res
    assert res["max_rel_err"] < 1e-5          # evicted records were recomputed, reused ones injected


def test_capture_adds_no_host_sync(monkeypatch):
    """CPU stand-in for CUDA sync-debug mode: no tensor-to-host read inside a capturing forward."""
    from trainer.check_grad import build_engine
    from engine.sampling_params import SamplingParams
    engine = build_engine("tiny-llama", "prefill+decode", seed=0)
    model = engine.runner.model
    original = model.forward

    def guarded(*args, **kwargs):
        def refuse(*a, **k):
            raise AssertionError("host sync inside the forward")
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
                m.setattr(torch.Tensor, name, refuse)
            return original(*args, **kwargs)
    model.forward = guarded
    seqs = engine.generate([[5, 6, 7, 8, 9, 10]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    record = engine.activation_pool.get((seqs[0][0].request_id, 0))
    assert record.captured == 6 + 5                    # prompt rows + every decoded input row


def test_capture_fraction_records_a_deterministic_share():
    from trainer.check_grad import build_engine
    from engine.sampling_params import SamplingParams
    engine = build_engine("tiny-llama", "prefill", seed=0)
    engine.capture.fraction = 0.5
    prompts = [[5 + i, 6, 7, 8] for i in range(40)]
    seqs = [s[0] for s in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))]
    recorded = [engine.activation_pool.get((s.request_id, 0)) is not None for s in seqs]
    assert recorded == [engine.capture.sampled(s) for s in seqs]
    assert 5 < sum(recorded) < 35


def test_a_request_opts_in_or_out_of_capture():
    """`capture` on a request overrides the server's policy both ways: with capture_fraction 0 (opt-in
    only) just the requests asking are recorded; with 1.0, one asking not to be is not."""
    from trainer.check_grad import build_engine
    from engine.sampling_params import SamplingParams
    engine = build_engine("tiny-llama", "prefill", seed=0)
    engine.capture.fraction = 0.0
    asks = [True, None, False, True]
    seqs = [engine.generate([[5 + i, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                                                capture=ask))[0][0] for i, ask in enumerate(asks)]
    assert [engine.activation_pool.get(s.record_key) is not None for s in seqs] == [True, False, False, True]
    engine.capture.fraction = 1.0
    seqs = [engine.generate([[50 + i, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                                                 capture=ask))[0][0] for i, ask in enumerate(asks)]
    assert [engine.activation_pool.get(s.record_key) is not None for s in seqs] == [True, True, False, True]


def test_prefix_cache_hits_still_reuse_the_rows_they_computed():
    """Requests sharing a system prompt hit the prefix cache; their records start after the hit and
    training recomputes only those first rows."""
    res = run_check("tiny-llama", "prefill", shared_prefix=20)
    _assert_exact_reuse(res)
    assert res["computed_rows"] > 5 * 16          # the cached prefix blocks of the later requests


def test_prompt_lm_term_adds_the_prompt_nll(tmp_path):
    """prompt_lm_weight w: loss = objective + w * mean NLL of prompt[1:], the NLL as HF computes it."""
    import torch.nn.functional as F

    from tests.helpers import make_tiny_model, tiny_engine
    from trainer.adapters import AdapterManager
    from trainer.lora import LoRAConfig
    from trainer.reuse import TrainRecord
    from trainer.step import forward_backward
    hf = make_tiny_model("llama-untied-gqa1", tmp_path)
    model = tiny_engine(tmp_path).runner.model
    manager = AdapterManager(model, LoRAConfig(rank=2, alpha=4, targets=("q_proj",)))   # B = 0: the base model
    adapters = manager.training_adapters(manager.masters())
    record = TrainRecord("r", [5, 9, 13, 21, 7, 40], [3, 8, 11])
    plain = forward_backward(model, [record], adapters, reuse=False).loss
    anchored = forward_backward(model, [record], adapters, reuse=False, prompt_lm_weight=0.5).loss
    with torch.no_grad():
        logits = hf(torch.tensor([record.prompt_ids])).logits[0, :-1].float()
    nll = float(F.cross_entropy(logits, torch.tensor(record.prompt_ids[1:])))
    assert anchored == pytest.approx(plain + 0.5 * nll, rel=1e-5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj", "up_proj", "down_proj")])
def test_packed_projections_train_like_separate_ones(model, targets):
    """With q|k|v and gate|up packed (as on CUDA) a training step runs one base GEMM or injection per
    group and one LoRA pair (A stacked, B block-diagonal; zero blocks for modules without an adapter):
    same loss and LoRA gradients as the separate projections, by reuse and by recompute."""
    from trainer.check_grad import adapted_engine, compare, serve_records, train_once
    from trainer.lora import ALL_PROJECTIONS, LoRAConfig
    engine, manager = adapted_engine(model, "prefill", 0, torch.Generator().manual_seed(0),
                                     lora=LoRAConfig(rank=4, alpha=8, targets=targets or ALL_PROJECTIONS))
    records = serve_records(engine, 0)
    separate = [train_once(engine, manager, records, reuse, 0) for reuse in (True, False)]
    pack_bases(engine.runner.model)
    assert getattr(engine.runner.model.model.layers[0].self_attn.q_proj.base, "packed", None) is not None
    packed = [train_once(engine, manager, records, reuse, 0) for reuse in (True, False)]
    for (res_sep, g_sep), (res_pack, g_pack) in zip(separate, packed):
        assert res_pack.outcomes == res_sep.outcomes and res_pack.reused_rows == res_sep.reused_rows
        assert abs(res_pack.loss - res_sep.loss) < 1e-6
        assert compare(g_pack, g_sep)["max_rel_err"] < 1e-5
    assert packed[0][0].outcomes == {"hit": len(records)} and packed[0][0].reused_rows > 0
    assert compare(packed[0][1], packed[1][1])["max_rel_err"] < 1e-5     # reuse == recompute, packed


def test_packed_serving_captures_each_group_in_one_write_and_reuse_stays_exact(monkeypatch):
    """Packed q|k|v and gate|up (as on CUDA) write their base outputs into the pool as one copy per
    group; the rows equal those of separate projections, and reuse by them equals recompute."""
    from engine.context import CaptureMetadata
    from store.pool_layout import KINDS
    from trainer.check_grad import adapted_engine, compare, serve_records, train_once
    writes, write = [], CaptureMetadata.write
    monkeypatch.setattr(CaptureMetadata, "write", lambda self, layer, kinds, packed, outs:
                        writes.append((kinds, packed is not None)) or write(self, layer, kinds, packed, outs))
    served = []
    for pack in (False, True):
        engine, manager = adapted_engine("tiny-qwen2", "prefill+decode", 0, torch.Generator().manual_seed(0))
        engine.capture.run_start = lambda slots: None             # the copying path (not in place)
        writes.clear()
        if pack:
            pack_bases(engine.runner.model)
        served.append((engine, manager, serve_records(engine, 0)))
    (plain, _, plain_records), (packed, manager, records) = served
    assert set(writes) == {(("q", "k", "v"), True), (("gate", "up"), True), (("o",), False), (("down",), False)}
    assert [r.response_ids for r in records] == [r.response_ids for r in plain_records]
    for record in records:
        for layer in range(2):
            for kind in KINDS:
                torch.testing.assert_close(packed.activation_pool.gather(record.key, layer, kind),
                                           plain.activation_pool.gather(record.key, layer, kind),
                                           rtol=1e-5, atol=1e-6)
    (reuse, g_reuse), (recompute, g_recompute) = [train_once(packed, manager, records, r, 0) for r in (True, False)]
    assert reuse.outcomes == {"hit": len(records)} and reuse.computed_rows == 0
    assert abs(reuse.loss - recompute.loss) < 1e-6
    assert compare(g_reuse, g_recompute)["max_rel_err"] < 1e-5


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("every_group", [True, False])
def test_steps_recording_one_run_of_slots_write_the_pool_in_place(pack, every_group):
    """A step whose recorded rows are one run of pool slots lets the projections write their outputs
    straight into the pool (no copy); the rows equal those of the copying path, and reuse stays exact.
    A group the pool cannot take in place (here: o and gate|up) is copied in such a step,
    through slots made on the device from the run (no host slot list)."""
    from engine.capture import CaptureManager
    from store.pool_layout import KINDS
    from trainer.check_grad import adapted_engine, compare, serve_records, train_once
    served = []
    for in_place in (False, True):
        engine, manager = adapted_engine("tiny-llama", "prefill+decode", 0, torch.Generator().manual_seed(0))
        if pack:
            pack_bases(engine.runner.model)
        if not in_place:                                           # every step copies its rows
            engine.capture.run_start = lambda slots: None
        else:
            slot_kinds, run_start = [], engine.capture.run_start
            engine.capture.run_start = lambda slots: slot_kinds.append(type(slots)) or run_start(slots)
            if not every_group:
                for kinds in (("o",), ("gate", "up"), ("gate",), ("up",)):
                    engine.activation_pool.direct_buffers.pop(kinds, None)
        served.append((engine, manager, serve_records(engine, 0)))
    (copied, _, copied_records), (direct, manager, records) = served
    assert direct.capture.steps["one_run"] > 0 and direct.capture.steps["scattered"] > 0
    assert set(slot_kinds) == {range, list}          # a lone prompt's run comes as a range: no list built
    assert isinstance(direct.capture, CaptureManager)
    for record in records:
        for layer in range(2):
            for kind in KINDS:
                torch.testing.assert_close(direct.activation_pool.gather(record.key, layer, kind),
                                           copied.activation_pool.gather(record.key, layer, kind),
                                           rtol=0, atol=0)
    (reuse, g_reuse), (recompute, g_recompute) = [train_once(direct, manager, records, r, 0) for r in (True, False)]
    assert reuse.outcomes == {"hit": len(records)} and reuse.computed_rows == 0
    assert abs(reuse.loss - recompute.loss) < 1e-6
    assert compare(g_reuse, g_recompute)["max_rel_err"] < 1e-5


@pytest.mark.parametrize("pack", [False, True])
def test_checkpointed_layers_give_the_same_step(pack):
    """Per-layer activation checkpointing (the low-memory modes) recomputes each layer in backward —
    injected rows, in-place LoRA adds and all — and gives the same loss and LoRA gradients."""
    from trainer.check_grad import adapted_engine, compare, serve_records, train_once
    engine, manager = adapted_engine("tiny-llama", "prefill", 0, torch.Generator().manual_seed(0))
    records = serve_records(engine, 0)
    if pack:
        pack_bases(engine.runner.model)
    results = {(reuse, ckpt): train_once(engine, manager, records, reuse, 0, checkpoint_layers=ckpt)
               for reuse in (True, False) for ckpt in (False, True)}
    assert results[True, True][0].reused_rows > 0
    for reuse in (True, False):
        (plain, g_plain), (ckpt, g_ckpt) = results[reuse, False], results[reuse, True]
        assert abs(plain.loss - ckpt.loss) < 1e-6 and compare(g_ckpt, g_plain)["max_rel_err"] < 1e-5


def test_capture_slots_of_one_run_are_made_once_on_demand():
    """A forward recorded into one run of pool slots carries no slot list; whoever needs one (a copy
    into the pool, the CUDA-graph decode's static slot buffer) gets first_slot + [0, T), made once."""
    from engine.context import CaptureMetadata
    meta = CaptureMetadata(pool=None, slot_mapping=None, first_slot=7)
    slots = meta.slots(3, torch.device("cpu"))
    assert slots.tolist() == [7, 8, 9] and meta.slots(3, torch.device("cpu")) is slots
    listed = CaptureMetadata(pool=None, slot_mapping=torch.tensor([4, 2]))
    assert listed.slots(2, torch.device("cpu")).tolist() == [4, 2]
