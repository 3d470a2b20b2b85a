"""Issue 18: the hedged-fetch planner with fake bandwidths: it fetches what lands in time, highest
FLOPs saved per byte first, recomputes the rest, and never plans a step slower than recomputing it."""
import random

import pytest
import torch

from common.errors import ConfigError
from store.pool_layout import PoolLayout
from store.pool_reader import HostUnit
from trainer.fetch_planner import Candidate, FetchPlanner, Rates, measure_rates, plan_fetches


def _copy_end_times(plan_fetch, layer_s, rates, head_start_s):
    """Replay the plan on one copy stream: each layer's copies start no earlier than the previous
    layer starts; returns [(copy end, layer start)] per layer with copies."""
    saved = [0.0] * len(layer_s)
    load = [0.0] * len(layer_s)
    for c in plan_fetch:
        load[c.layer] += c.nbytes / rates.h2d_bytes_per_s
        saved[c.layer] += c.flops / rates.flops_per_s
    ends, start, end, previous = [], 0.0, float("-inf"), -head_start_s
    for layer, seconds in enumerate(layer_s):
        if load[layer]:
            end = max(end, previous) + load[layer]
            ends.append((end, start))
        previous, start = start, start + max(seconds - saved[layer], 0.0)
    return ends


def test_everything_fetched_when_the_copy_stream_is_fast():
    rates = Rates(h2d_bytes_per_s=1e12, flops_per_s=1e9)
    cands = [Candidate(i, layer, 1000, 1e6) for i, layer in enumerate([1, 2, 3, 1])]
    plan = plan_fetches(cands, [1.0] * 4, rates)
    assert sorted(plan.fetch) == [0, 1, 2, 3] and plan.recompute == []
    assert plan.planned_s == pytest.approx(4.0 - 4e-3)


def test_nothing_fetched_when_copies_cannot_land_in_time():
    """Layer 0's rows cannot be prefetched without a head start; a slow stream lands nothing."""
    rates = Rates(h2d_bytes_per_s=1.0, flops_per_s=1e9)
    cands = [Candidate(i, i % 3, 1000, 1e6) for i in range(6)]
    plan = plan_fetches(cands, [1.0] * 3, rates)
    assert plan.fetch == [] and len(plan.recompute) == 6
    assert plan.planned_s == plan.recompute_s == 3.0
    layer0 = plan_fetches([Candidate("a", 0, 10, 1e3)], [1.0], Rates(1e12, 1e9))
    assert layer0.fetch == [] and layer0.recompute == ["a"]
    ahead = plan_fetches([Candidate("a", 0, 10, 1e3)], [1.0], Rates(1e12, 1e9), head_start_s=1e-3)
    assert ahead.fetch == ["a"]


def test_fetches_what_fits_highest_flops_per_byte_first():
    """One layer's window (0.1 s before layer 1 starts) holds 100 bytes at 1000 B/s: of three
    candidates of 60 bytes, the one saving the most per byte is fetched, then nothing else fits."""
    rates = Rates(h2d_bytes_per_s=1000.0, flops_per_s=1e12)
    cands = [Candidate("cheap", 1, 60, 60 * 4096.0), Candidate("down", 1, 60, 60 * 14336.0),
             Candidate("mid", 1, 60, 60 * 8000.0)]
    plan = plan_fetches(cands, [0.1, 0.1], rates)
    assert plan.fetch == ["down"] and sorted(plan.recompute) == ["cheap", "mid"]
    assert plan.transfer_s == pytest.approx(0.06)


def test_skipped_gemms_shorten_the_window_of_later_layers():
    """A fetched row at layer 1 makes layer 2 start earlier: a copy for layer 2 that would fit
    without it does not fit with it, and the planner keeps both windows honest."""
    rates = Rates(h2d_bytes_per_s=100.0, flops_per_s=100.0)
    first = Candidate("first", 1, 50, 90.0)         # copy 0.5 s, saves 0.9 s of layer 1's 1 s
    second = Candidate("second", 2, 60, 60.0)        # copy 0.6 s: layer 1 lasts 0.1 s once first is fetched
    plan = plan_fetches([first, second], [1.0, 1.0, 1.0], rates)
    assert plan.fetch == ["first"] and plan.recompute == ["second"]
    alone = plan_fetches([second], [1.0, 1.0, 1.0], rates)
    assert alone.fetch == ["second"]


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_never_slower_than_recompute_and_every_copy_lands_in_time(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 8)
    layer_s = [rng.uniform(0.001, 0.01) for _ in range(layers)]
    rates = Rates(h2d_bytes_per_s=rng.choice([1e5, 1e6, 1e7]), flops_per_s=rng.choice([1e8, 1e9]))
    cands = [Candidate(i, rng.randrange(layers), rng.randint(100, 5000), rng.uniform(1e3, 1e6))
             for i in range(rng.randint(0, 40))]
    head = rng.choice([0.0, 0.002])
    plan = plan_fetches(cands, layer_s, rates, head)
    assert sorted(plan.fetch + plan.recompute) == list(range(len(cands)))
    assert plan.planned_s <= plan.recompute_s + 1e-12
    chosen = [c for c in cands if c.unit in set(plan.fetch)]
    assert all(end <= start + 1e-12 for end, start in _copy_end_times(chosen, layer_s, rates, head))
    if any(c.layer > 0 for c in cands) and rates.h2d_bytes_per_s >= 1e7:
        assert plan.fetch                            # a fast stream lands something past layer 0


def test_planner_over_host_units_of_a_layout():
    """FetchPlanner turns a step's host units into candidates: FLOPs saved = 2·rows·d_in·d_out, so
    with room for only part, `down` rows (the widest input) go first."""
    layout = PoolLayout(2, {"q": 8, "o": 8, "gate": 32, "down": 8}, torch.float32,
                        input_dims={"q": 8, "o": 8, "gate": 8, "down": 32})
    units = [HostUnit(0, 1, kind, 10, 10 * layout.dims[kind] * 4) for kind in layout.dims]
    per_layer_s = 64 * sum(2.0 * layout.input_dims[k] * d for k, d in layout.dims.items()) / 1e6
    rates = Rates(h2d_bytes_per_s=320 / per_layer_s * 1.01, flops_per_s=1e6)   # ~320 bytes per layer window
    plan = FetchPlanner(rates).plan(units, layout, num_rows=64)
    assert [u.kind for u in plan.fetch] == ["down"]
    assert plan.planned_s < plan.recompute_s


def test_rates_must_be_positive_and_can_be_measured():
    with pytest.raises(ConfigError):
        Rates(0.0, 1e9)
    rates = measure_rates(torch.device("cpu"), torch.float32, mib=1, gemm=64)
    assert rates.h2d_bytes_per_s > 0 and rates.flops_per_s > 0
