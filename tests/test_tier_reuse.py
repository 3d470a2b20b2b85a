"""Issue 18: training reads every tier of the activation pool. Rows on the host tier are copied in,
dropped kinds are multiplied, and the gradients stay those of recomputation, to the last bit in
float64 (`alchemist check-grad --tier cpu`, `--demote gate,up`)."""
import pytest
import torch

from trainer.check_grad import adapted_engine, compare, demote_kinds, run_check, serve_records
from trainer.fetch_planner import FetchPlanner, Rates
from trainer.step import forward_backward

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
MODELS = ["tiny-llama", "tiny-qwen2", pytest.param("smollm2", marks=pytest.mark.slow)]


def _assert_bit_exact(res):
    assert res["outcomes"] == {"hit": res["records"]} and res["reused_rows"] > 0, res
    assert res["loss_reuse"] == res["loss_recompute"], res
    assert res["max_rel_err"] == 0.0, res


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("capture", ["prefill", "prefill+decode"])
def test_check_grad_host_tier_is_bit_exact(model, capture):
    res = run_check(model, capture, dtype="float64", tier="cpu")
    _assert_bit_exact(res)
    rows = res["pool_rows"]
    assert all(rows[f"cpu/{kind}"] > 0 for kind in KINDS), rows            # every kind came from the host
    assert not any(key.startswith(("device/", "recomputed/")) for key in rows), rows
    assert res["pool"]["records"]["cpu"] == res["records"] and res["pool"]["records"]["device"] == 0
    assert res["pool"]["traffic_bytes"]["h2d"] > 0


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("capture", ["prefill", "prefill+decode"])
def test_check_grad_demoted_kinds_are_multiplied_bit_exact(model, capture):
    res = run_check(model, capture, dtype="float64", demote=("gate", "up"))
    _assert_bit_exact(res)
    rows = res["pool_rows"]
    assert rows["recomputed/gate"] == rows["recomputed/up"] == rows["device/down"] > 0, rows
    assert "device/gate" not in rows and "cpu/gate" not in rows


def test_demote_flag_parses_kinds_and_rejects_unknown_ones():
    assert demote_kinds("gate,up") == ("gate", "up")
    with pytest.raises(Exception, match="unknown kind"):
        demote_kinds("gate,mlp")


def test_mixed_tiers_and_a_partial_fetch_plan_in_one_batch_stay_exact():
    """One batch: records on the device, on the host, with down dropped, and a planner that can fetch
    only part of the host rows (the rest multiplied): float64 gradients equal recompute's exactly."""
    gen = torch.Generator().manual_seed(3)
    engine, manager = adapted_engine("tiny-llama", "prefill", 3, gen, "float64", cpu_pool_bytes=64 << 20)
    records = serve_records(engine, 3)
    pool = engine.activation_pool
    keys = [r.key for r in records]
    pool.demote(keys[0], KINDS, "cpu")
    pool.demote(keys[1], KINDS, "cpu")
    pool.demote(keys[1], ("down",), "dropped")
    pool.demote(keys[2], ("q", "k", "v"), "cpu")                     # q|k|v on the host, the rest on the device
    # a copy stream about as fast as the GEMMs: some host rows land in time, not all
    planner = FetchPlanner(Rates(h2d_bytes_per_s=4e9, flops_per_s=1e9), head_start_s=0.0)
    results = {}
    for reuse in (True, False):
        masters = manager.masters(engine.adapter_version)
        result = forward_backward(engine.runner.model, records, manager.training_adapters(masters), pool=pool,
                                  reuse=reuse, trainer_version=engine.adapter_version, fetch_planner=planner)
        results[reuse] = (result, [t.grad.clone() for pair in masters.values() for t in pair])
        for pair in masters.values():
            for t in pair:
                t.grad = None
    (reused, g_reuse), (recomputed, g_recompute) = results[True], results[False]
    assert reused.loss == recomputed.loss
    assert compare(g_reuse, g_recompute)["max_rel_err"] == 0.0
    rows = reused.pool_rows
    assert rows["device/q"] > 0 and rows["cpu/q"] > 0 and rows["recomputed/down"] > 0, rows
    plan = reused.fetch_plan
    assert plan["fetched_units"] > 0 and plan["recomputed_units"] > 0, plan
    assert plan["planned_s"] <= plan["recompute_s"]
