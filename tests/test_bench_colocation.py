"""Smoke test of the co-location benchmark at the tiny shape on the CPU (the numbers mean nothing here;
the GPU run is benchmarks/gpu_colocation.py on an H200)."""
import json
import math
import random

import pytest
import torch

from benchmarks import colocation_workload, gpu_colocation


@pytest.fixture
def one_thread():
    """Two intra-op threads on a busy 2-core machine stall for hundreds of ms; one is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_colocation_tiny_cpu(tmp_path, one_thread):
    rng = random.Random(0)
    records = [{"prompt": [rng.randrange(49152) for _ in range(rng.randint(16, 96))],
                "response": [rng.randrange(49152) for _ in range(rng.randint(8, 48))]} for _ in range(32)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(records))
    whole = gpu_colocation.main(["--shape", "tiny", "--duration", "3", "--capacity-requests", "8", "--min-records", "1",
                                 "--modes", "thread,interleaved:duty=0.5,burn-python:duty=0.5", "--load", "0.5,0.25",
                                 "--standalone-records", "6", "--seed", "3",
                                 "--rating-delay", "lognormal:0.3:1.0", "--rating-wait-s", "10",
                                 "--sharegpt", str(tmp_path / "sharegpt.json"), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "gpu_colocation.json").read_text()) == json.loads(json.dumps(whole))
    assert set(whole["loads"]) == {"0.5", "0.25"}
    alone = whole["standalone"]                                 # no serving: bare recompute vs the trainer
    assert alone["records"] == 6 and alone["own_recompute_tok_s"] > 0 and alone["train_error"] is None
    assert alone["trainer_tokens"] == alone["own_recompute"]["tokens"] and alone["trainer_vs_own_recompute"] > 0
    quarter = json.loads((tmp_path / "out" / "gpu_colocation-seed3-load0.25.json").read_text())
    assert quarter["args"]["load"] == 0.25 and quarter["rate_req_s"] < whole["loads"]["0.5"]["rate_req_s"]
    res = json.loads((tmp_path / "out" / "gpu_colocation-seed3-load0.5.json").read_text())
    assert res["capacity"]["req_s"] > 0 and res["rate_req_s"] == pytest.approx(0.5 * res["capacity"]["req_s"])
    off, on, interleaved = res["off"], res["on thread"], res["on interleaved:duty=0.5"]
    assert on["latency_budget"]["slo_ratio"] == 1.15 and on["trained_share_of_standalone"] > 0
    assert on["backlog_at_window_end"]["backlog_ratings"] >= 0 and isinstance(on["backlog_fits_one_step"], bool)
    assert sum(on["staleness"].values()) >= 1 and on["train_cpu_ms_per_step"] > 0
    share = on["reuse_flops_share"]                             # ratings came 0.3 s (median) after their answers
    assert 0 <= share["share"] <= 1 and share["ideal_tflops"] > 0 and on["ratings_never_sent"] == 0
    assert share["share"] == pytest.approx(share["from_device"] + share["from_retained"] + share["from_host"])
    for run in (off, on, interleaved):
        assert run["requests"] == res["scheduled_requests"] > 0
        for m in ("ttft", "tbt"):
            assert run[f"{m}_p99_ms"] >= run[f"{m}_p50_ms"] > 0
        assert run["out_tok_s"] > 0 and run["tbt_samples"] > 0
        steps = run["engine_step_ms"]                           # where TBT goes, per engine step
        assert steps["decode"]["n"] + steps["with_prompt"]["n"] == steps["gap_between_steps"]["n"] + 1 > 1
        assert steps["decode_while_training"]["n"] + steps["decode_while_idle"]["n"] == steps["decode"]["n"]
        assert 1 <= len(run["slowest_iterations"]) <= 8 and run["slowest_iterations"][0]["ms"] > 0
    assert off["train_steps"] == 0 and off["trained_tokens"] == 0 and off["rated"] == 0
    burn = res["on burn-python:duty=0.5"]                      # a synthetic load: nothing rated or trained
    assert burn["rated"] == 0 and burn["train_steps"] == 0 and 0 < burn["burn_busy_frac"] <= 1
    assert burn["tbt_samples"] == off["tbt_samples"]
    for run in (on, interleaved):
        assert run["rated"] >= 1 and run["train_steps_incl_drain"] >= 1 and run["train_error"] is None
        assert run["trained_tokens"] == run["reuse_tokens"] + run["recompute_tokens"] >= 0
        assert run["trained_tok_s"] == pytest.approx(run["trained_tokens"] / 3)
        assert run["tbt_samples"] == off["tbt_samples"]          # same schedule, same output lengths
        assert all(math.isfinite(v) and v > 0 for v in run["ratio_on_off"].values())


def test_rating_delays_follow_the_asked_distribution_and_leave_the_schedule_alone():
    workload = [([1, 2, 3], 4)] * 5
    plain = colocation_workload.schedule(workload, 200.0, 20.0, 0, 0.5)
    late = colocation_workload.schedule(workload, 200.0, 20.0, 0, 0.5, delay="lognormal:20:120")
    assert [(s["t"], s["rating"]) for s in plain] == [(s["t"], s["rating"]) for s in late]
    delays = sorted(s["delay"] for s in late if s["rating"] is not None)
    assert all(s["delay"] is None for s in late if s["rating"] is None)
    assert len(delays) > 1000
    assert delays[len(delays) // 2] == pytest.approx(20, rel=0.15)
    assert delays[int(len(delays) * 0.9)] == pytest.approx(120, rel=0.2)
    assert all(s["delay"] == 0.0 for s in plain if s["rating"] is not None)
    with pytest.raises(ValueError):
        colocation_workload.rating_delay("lognormal:120:20")
    queue = colocation_workload.RatingQueue()
    queue.push(2.0, "b", -1)
    queue.push(1.0, "a", 1)
    assert queue.next_due() == 1.0 and queue.due(1.5) == [("a", 1)] and len(queue) == 1


def test_opt_in_schedule_captures_exactly_the_requests_to_be_rated():
    workload = [([1, 2, 3], 4)] * 5
    plain = colocation_workload.schedule(workload, 50.0, 2.0, 0, 0.3)
    opted = colocation_workload.schedule(workload, 50.0, 2.0, 0, 0.3, opt_in=True)
    assert [s["rating"] for s in plain] == [s["rating"] for s in opted]        # same seeded schedule
    assert all(s["capture"] is None for s in plain)
    assert [s["capture"] for s in opted] == [s["rating"] is not None for s in opted]
    assert 0 < sum(s["capture"] for s in opted) < len(opted)
