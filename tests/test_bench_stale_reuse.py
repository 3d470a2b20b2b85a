"""Smoke test of benchmarks/stale_reuse_cpu.py: stale reuse after real optimizer steps is measured on
rows that really are stale (the outcome says so), and at staleness 0 it is exact."""
from benchmarks import stale_reuse_cpu


def test_stale_reuse_after_real_steps_tiny():
    res = stale_reuse_cpu.main(["--model", "tiny-llama", "--max-staleness", "1", "--seeds", "0", "--warm-steps", "2"])
    exact, stale = res["runs"]
    assert exact["outcomes"] == {"hit": exact["outcomes"]["hit"]} and exact["reused_rows"] > 0
    assert exact["cosine"] > 1 - 1e-9
    assert stale["outcomes"] == {"stale": stale["outcomes"]["stale"]} and stale["reused_rows"] > 0
    assert 0.99 < stale["cosine"] < 1 - 1e-9                   # moved, by a little: real steps are small
