"""Shared benchmark helpers: model shapes, building an engine, device ceilings, timing, reporting."""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import time

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.setup import build_activation_pool, build_engine_parts

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
LLAMA_1B = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)


def llama_config(shape: dict):
    from transformers import LlamaConfig
    return LlamaConfig(**shape)


def build_engine(cfg: EngineConfig, hf_config=None) -> LLMEngine:
    """The benchmarks' composition root: the engine's parts, the activation pool its config asks for
    (built before the engine sizes its KV cache), and the engine."""
    parts = build_engine_parts(cfg, hf_config=hf_config)
    return LLMEngine(cfg, parts, build_activation_pool(cfg, parts))


def git_commit() -> str:
    try:
        return os.environ.get("ALCHEMIST_COMMIT") or subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("ALCHEMIST_COMMIT", "unknown")


def copy_bandwidth(nbytes: int = 4 << 30, iters: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def event_time(fn, iters: int = 50, graph: bool = False) -> float:
    """Seconds per call of `fn` on the GPU (CUDA events, after 5 warm-up calls); `graph`: `iters` calls
    captured in one CUDA graph and its replay timed, so launch gaps are left out."""
    for _ in range(5):
        fn()
    if graph:                       # launch gaps out: capture `iters` calls, time the replay
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        fn = g.replay
        iters_run, fn_calls = iters, 1
    else:
        iters_run, fn_calls = iters, iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(fn_calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters_run / 1e3


def matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t) / 1e12


def blocking_sync() -> None:
    """Make the host sleep, not spin, while it waits for the GPU (the primary context's
    CU_CTX_SCHED_BLOCKING_SYNC), so a thread's CPU time counts its own work only. Call it before
    anything starts CUDA; a no-op without a CUDA driver."""
    import ctypes
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return
    device = ctypes.c_int()
    if driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), 0) == 0:
        driver.cuDevicePrimaryCtxSetFlags(device, 4)             # 4: CU_CTX_SCHED_BLOCKING_SYNC


def timed(fn, warmup: int = 1, repeat: int = 5):
    """Median wall time of `fn()` (synchronized) after warm-up; returns (median seconds, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def kernel_times(fn, calls: int) -> dict[str, tuple[float, float]]:
    """CUDA kernel name -> (µs per call of fn, launches per call of fn), over `calls` calls (on a
    machine without CUDA: CPU operator self time instead)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        total = event.self_cpu_time_total
        if cuda:     # named cuda_time_total before torch 2.4
            total = getattr(event, "device_time_total", None)
            total = event.cuda_time_total if total is None else total
        if total:
            out[event.key] = (total / calls, event.count / calls)
    return out


class GcClock:
    """Seconds the interpreter spent in garbage collection, and collections per generation, while
    registered (`with GcClock() as clock:`); read `seconds` before and after a region to attribute."""

    def __init__(self):
        self.seconds, self.collections, self._start = 0.0, [0, 0, 0], None

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1
            self._start = None


def emit(results: dict, out_dir: str | None, name: str) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            f.write(text)
