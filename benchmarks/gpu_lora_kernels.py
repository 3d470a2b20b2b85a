"""LoRA add per projection group on one GPU (engine/kernels/lora.py, engine.lora_kernel): the base GEMM
alone against base + each way of adding a rank-16-per-projection adapter, for the 8B groups (q|k|v
4096 -> 6144, gate|up 4096 -> 28672, o 4096 -> 4096, down 14336 -> 4096) at T = 1 (decode: timed as
a CUDA graph of `--iters` calls, launch gaps out) and T = 1024 (prefill: eager and as a graph).

Options: torch = today's two GEMMs out of place (engine.packing.lora_added); triton = one shrink and
one in-place expand launch; folded = one GEMM over [W; A] giving [y | s], then the expand. Each
option's `ratio` is its time over the base GEMM's (LoRA on / off); `layer` sums the four groups.
`--smoke`: tiny shapes on the CPU, torch path only (what the CPU test runs).

    python -m benchmarks.gpu_lora_kernels --out $OUT/gpu_lora_kernels.json [--iters 200]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.common import event_time, git_commit
from engine.kernels.lora import lora_add, lora_expand, lora_shrink, make_slices, uses_triton
from engine.packing import lora_added

GROUPS_8B = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]),
             "o": (4096, [4096]), "down": (14336, [4096])}
GROUPS_SMOKE = {"qkv": (64, [64, 16, 16]), "gate_up": (64, [96, 96]), "o": (64, [64]), "down": (96, [64])}
RANK, ALPHA = 16, 2.0


def seconds(fn, iters: int, graph: bool) -> float:
    """Seconds per call: CUDA events (in a graph when asked) on the GPU, the wall clock on the CPU."""
    if torch.cuda.is_available():
        return event_time(fn, iters=iters, graph=graph)
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def group_tensors(in_features: int, outs: list[int], t: int, dtype, device) -> dict:
    """Inputs, base weight, LoRA factors (block-diagonal B) and the folded weight of one group."""
    slices = make_slices(outs, [RANK] * len(outs), device)
    out, rank = slices.out_features, slices.rank
    weight = torch.randn(out, in_features, dtype=dtype, device=device) / in_features ** 0.5   # [out, in]
    a = torch.randn(rank, in_features, dtype=dtype, device=device) / in_features ** 0.5      # [R, in]
    b = torch.zeros(out, rank, dtype=dtype, device=device)                                   # [out, R]
    for out_start, out_end, rank_start, r in slices.table.tolist():
        b[out_start:out_end, rank_start:rank_start + r] = 0.1 * torch.randn(out_end - out_start, r,
                                                                            dtype=dtype, device=device)
    x = torch.randn(t, in_features, dtype=dtype, device=device)                              # [T, in]
    return dict(x=x, weight=weight, a=a, b=b, slices=slices, full=torch.cat([weight, a]))


def options(g: dict, with_triton: bool) -> dict:
    """name -> one call of base + that LoRA option (returns the output)."""
    x, weight, a, b, slices, full = g["x"], g["weight"], g["a"], g["b"], g["slices"], g["full"]
    out = slices.out_features

    def folded():
        both = F.linear(x, full)                                    # both: [T, out + R]
        y = both[:, :out]
        return lora_expand(y, both[:, out:], b, ALPHA, slices, out=y)

    calls = {"base": lambda: F.linear(x, weight),
             "torch": lambda: lora_added(F.linear(x, weight), x, a, b, ALPHA)}
    if with_triton:
        calls["triton"] = lambda: in_place(F.linear(x, weight), x, a, b, slices)
        calls["folded"] = folded
        s = lora_shrink(x, a)                                       # s: [splits, T, R]
        y = F.linear(x, weight)                                     # y: [T, out]
        calls["shrink_only"] = lambda: lora_shrink(x, a)
        calls["expand_only"] = lambda: lora_expand(y, s, b, ALPHA, slices, out=y)
    return calls


def in_place(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slices) -> torch.Tensor:
    """y [T, out] += the group's LoRA delta of x [T, in], fused kernels (triton option)."""
    return lora_add(y, x, a, b, ALPHA, slices, out=y)


def measure(name: str, in_features: int, outs: list[int], t: int, args, dtype, device) -> dict:
    g = group_tensors(in_features, outs, t, dtype, device)
    calls = options(g, with_triton=not args.smoke and uses_triton(g["x"]))
    modes = [("graph", True)] if t == 1 else [("eager", False), ("graph", True)]
    if device == "cpu":
        modes = [("eager", False)]
    row = {"group": name, "in": in_features, "outs": outs, "tokens": t, "options": {}}
    for mode, graph in modes:
        base = seconds(calls["base"], args.iters, graph)
        row[f"base_ms{'' if mode == modes[0][0] else '_' + mode}"] = base * 1e3
        for option, fn in calls.items():
            if option == "base":
                continue
            ms = seconds(fn, args.iters, graph) * 1e3
            entry = row["options"].setdefault(option, {})
            suffix = "" if mode == modes[0][0] else "_" + mode
            entry["ms" + suffix] = ms
            entry["ratio" + suffix] = ms / (base * 1e3)
            entry["mode" if not suffix else "mode" + suffix] = mode
    if "triton" in calls:                                           # sanity: the options agree
        want = calls["torch"]().float()
        row["max_abs_diff"] = {o: (calls[o]().float() - want).abs().max().item() for o in ("triton", "folded")}
    return row


def layer_sums(rows: list[dict]) -> dict:
    """Per T: the four groups' times added up (a layer's projections), base and each option, and ratios."""
    out = {}
    for t in sorted({r["tokens"] for r in rows}):
        mine = [r for r in rows if r["tokens"] == t]
        base = sum(r["base_ms"] for r in mine)
        sums = {o: sum(r["options"][o]["ms"] for r in mine) for o in mine[0]["options"]}
        out[str(t)] = {"base_ms": base, **{o: {"ms": ms, "ratio": ms / base} for o, ms in sums.items()}}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="a .json file, or a folder (gpu_lora_kernels.json in it)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, torch path only")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.smoke:
        args.iters, args.tokens = min(args.iters, 3), [1, 8]
    groups = GROUPS_SMOKE if args.smoke else GROUPS_8B
    torch.manual_seed(0)
    rows = [measure(name, in_features, outs, t, args, dtype, device)
            for t in args.tokens for name, (in_features, outs) in groups.items()]
    result = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": args.smoke,
              "rank_per_projection": RANK, "iters": args.iters, "rows": rows, "layer": layer_sums(rows)}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    write(result, args.out)
    return result


def write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if not out:
        return
    path = out if out.endswith(".json") else os.path.join(out, "gpu_lora_kernels.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
