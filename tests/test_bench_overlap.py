"""Smoke test of the overlapped-scheduling benchmark at the tiny shape on the CPU (the numbers mean
nothing here; the GPU run is benchmarks/gpu_overlap.py on an H200)."""
import json

from benchmarks import gpu_overlap


def test_overlap_benchmark_tiny_cpu(tmp_path):
    res = gpu_overlap.main(["--shape", "tiny", "--requests", "4", "--prompt-len", "24", "--out-len", "6",
                            "--repeat", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_overlap.json").read_text()) == json.loads(json.dumps(res))
    assert res["sync"]["out_tokens"] == res["overlap"]["out_tokens"] == 4 * 6
    assert res["ratios"]["throughput_overlap_vs_sync"] > 0 and res["sync"]["decode_b1"]["step_ms"] > 0
