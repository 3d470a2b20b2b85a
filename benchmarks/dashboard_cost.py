"""What the dashboard and the metrics cost serving (issue 19): a live `alchemist serve` (a tiny random
Llama on the CPU, online training on, no ratings) under a closed-loop streaming chat load, measured in
interleaved phases without polling ("off") and with a client polling every second -- harsher than the
page's 3 s refresh and compose's 5 s scrape. Modes (`--modes`, "off" first):

    page     GET /dashboard/data as the page asks (whole history once, then `?since=` the newest point
             seen) + GET /metrics
    full     the whole /dashboard/data history every time + GET /metrics
    metrics  GET /metrics alone;  data  the whole /dashboard/data alone

Each round runs one phase of each mode, in a rotated order (reversed every other round) so a drift
cancels; the server's own dashboard sampler (every `dashboard_interval_s`) runs in all. Reports each
mode's throughput and latency, its ratios to "off" (pooled, and per round: the phases of a round ran
back to back), the spread of the off phases among themselves as the noise to compare with, and the
server process's CPU time (/proc/PID/stat, every thread) per output token and per second idle in each
mode: on a shared machine CPU time is steadier than throughput.

    python -m benchmarks.dashboard_cost --out FILE [--modes off,page --rounds 4 --phase-s 15]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Write a haiku about rain.", "Name three colors and a fruit of each.",
           "Explain what a lighthouse keeper does, briefly.", "Count from one to ten in words."]


def git_commit() -> str:
    from benchmarks.common import git_commit as commit
    return commit()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(work: Path, args) -> tuple:
    """`alchemist serve` in its own process on the tiny model; (process, url) once /health answers."""
    from engine.embedded_model import ensure_default_model
    from server.testing import free_port, make_tiny_model, serve_process
    model = make_tiny_model(work / "tiny-llama", ensure_default_model())
    config = work / "config.json"
    config.write_text(json.dumps({"db_path": str(work / "alchemist.db"),
                                  "engine": {"device": "cpu", "kv_cache_bytes": 32 << 20,
                                             "activation_pool_bytes": 32 << 20}}))
    port = free_port()
    env = {**os.environ, "ALCHEMIST_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("ALCHEMIST_API_KEYS", None)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
           "--model", str(model), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    return serve_process(cmd, env, work / "server.log", url, cwd=ROOT), url


async def one_chat(client: httpx.AsyncClient, i: int, max_tokens: int, out: dict) -> None:
    """One streamed chat; appends its TTFT, inter-chunk gaps, end-to-end time and output tokens."""
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "temperature": 0.7, "seed": i}
    start = time.perf_counter()
    last, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"chat answered {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if last is None:
                out["ttft"].append(now - start)
            else:
                out["itl"].append(now - last)
            last = now
    out["e2e"].append(time.perf_counter() - start)
    out["tokens"] += tokens


POLL_MODES = {"off": (), "page": ("data-since", "metrics"), "full": ("data", "metrics"),
              "metrics": ("metrics",), "data": ("data",)}


async def poll(client: httpx.AsyncClient, stop: asyncio.Event, out: dict, spec: tuple, cursor: dict) -> None:
    """GET each polled thing of `spec` once a second until `stop`; keeps each answer's latency and size.
    "data-since" is /dashboard/data as the page asks for it: only the points after the newest seen
    (`cursor`, kept across phases as an open page keeps it); "data" the whole history every time."""
    while not stop.is_set():
        tick = time.perf_counter()
        for item in spec:
            path = "/metrics" if item == "metrics" else "/dashboard/data"
            since = cursor.get("t") if item == "data-since" else None
            t = time.perf_counter()
            r = await client.get(path, params={} if since is None else {"since": since})
            if r.status_code != 200:
                raise RuntimeError(f"{path} answered {r.status_code}")
            got = out.setdefault(item, {"s": [], "bytes": []})
            got["s"].append(time.perf_counter() - t)
            got["bytes"].append(len(r.content))
            if path == "/dashboard/data" and r.json()["series"].get("t"):
                cursor["t"] = r.json()["series"]["t"][-1]
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.perf_counter() - tick)))
        except asyncio.TimeoutError:
            pass


async def idle(url: str, pid: int, seconds: float, spec: tuple, cursor: dict) -> dict:
    """No chats for `seconds`, polled as `spec` says: the server's CPU time per second."""
    polls = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        stop = asyncio.Event()
        poller = asyncio.create_task(poll(client, stop, polls, spec, cursor))
        cpu, start = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(seconds)
        res = {"cpu_ms_per_s": (cpu_seconds(pid) - cpu) * 1e3 / (time.perf_counter() - start)}
        stop.set()
        await poller
    return {**res, "polls": {item: len(v["s"]) for item, v in polls.items()}}


async def phase(url: str, pid: int, seconds: float, args, spec: tuple, cursor: dict) -> dict:
    """`args.concurrency` clients chat back to back for `seconds` (the last chats finish after it)."""
    out, polls = {"ttft": [], "itl": [], "e2e": [], "tokens": 0}, {}
    deadline = time.perf_counter() + seconds
    counter = iter(range(10 ** 9))
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            while time.perf_counter() < deadline:
                await one_chat(client, next(counter), args.max_tokens, out)
        stop = asyncio.Event()
        poller = asyncio.create_task(poll(client, stop, polls, spec, cursor))
        cpu, start = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        out["cpu_s"] = cpu_seconds(pid) - cpu
        stop.set()
        await poller
    return summarize(out, elapsed, polls)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(out: dict, elapsed: float, polls: dict) -> dict:
    res = {"seconds": elapsed, "requests": len(out["e2e"]), "out_tok_s": out["tokens"] / elapsed,
           "req_s": len(out["e2e"]) / elapsed, "tokens": out["tokens"], "server_cpu_s": out["cpu_s"],
           "cpu_ms_per_token": out["cpu_s"] * 1e3 / max(1, out["tokens"]),
           "samples": {k: out[k] for k in ("ttft", "itl", "e2e")}}
    for key in ("ttft", "itl", "e2e"):
        res[f"{key}_p50_ms"] = pct(out[key], 0.5) * 1e3
        res[f"{key}_p99_ms"] = pct(out[key], 0.99) * 1e3
    res["polls"] = {item: {"count": len(v["s"]), "p50_ms": pct(v["s"], 0.5) * 1e3, "max_ms": max(v["s"]) * 1e3,
                           "bytes_last": v["bytes"][-1]} for item, v in polls.items() if v["s"]}
    return res


LATENCY_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms")
PAIRED_KEYS = ("out_tok_s", "cpu_ms_per_token", "ttft_p99_ms", "itl_p99_ms")


def mode_row(mine: list[dict]) -> dict:
    """A mode's throughput (median over its phases) and latency percentiles (over all its samples)."""
    pooled = {k: [x for p in mine for x in p["samples"][k]] for k in ("ttft", "itl", "e2e")}
    row = {"phases": len(mine), "requests": sum(p["requests"] for p in mine),
           "out_tok_s": statistics.median(p["out_tok_s"] for p in mine),
           "req_s": statistics.median(p["req_s"] for p in mine),
           "server_cpu_ms_per_out_token": 1e3 * sum(p["server_cpu_s"] for p in mine) / sum(p["tokens"] for p in mine)}
    for key in LATENCY_KEYS:
        name, q = key.split("_")[0], 0.5 if "_p50_" in key else 0.99
        row[key] = pct(pooled[name], q) * 1e3
    return row


def compare(phases: list[dict], modes: list[str]) -> dict:
    """Each mode's row; each polled mode against "off": the ratio of the rows, the per-round ratios
    (the phases of a round ran back to back) and their medians; the off phases' own spread."""
    rows = {m: mode_row([p for p in phases if p["mode"] == m]) for m in modes}
    polled = [m for m in modes if m != "off"]
    ratio = {m: {k: rows[m][k] / rows["off"][k] for k in ("out_tok_s", "server_cpu_ms_per_out_token", *LATENCY_KEYS)}
             for m in polled}
    paired = {m: {k: paired_ratios(phases, m, k) for k in PAIRED_KEYS} for m in polled}
    off = [p["out_tok_s"] for p in phases if p["mode"] == "off"]
    return {"modes": rows, "ratio_vs_off": ratio, "paired_vs_off": paired,
            "paired_median_vs_off": {m: {k: statistics.median(v) for k, v in d.items()} for m, d in paired.items()},
            "off_out_tok_s_spread": max(off) / min(off)}


def paired_ratios(phases: list[dict], mode: str, key: str) -> list[float]:
    """`mode` / off of `key` within each round."""
    def of(r, m):
        return next(p[key] for p in phases if p["round"] == r and p["mode"] == m)
    return [of(r, mode) / of(r, "off") for r in sorted({p["round"] for p in phases})]


async def run(url: str, pid: int, args, modes: list[str]) -> tuple[list[dict], dict]:
    cursor: dict = {}
    idle_cpu = {m: await idle(url, pid, args.idle_s, POLL_MODES[m], cursor) for m in modes}
    print("idle server CPU, ms/s: " + ", ".join(f"{m} {v['cpu_ms_per_s']:.1f}" for m, v in idle_cpu.items()),
          flush=True)
    await phase(url, pid, args.warmup_s, args, POLL_MODES[modes[-1]], cursor)         # warm-up, dropped
    phases = []
    for r in range(args.rounds):
        k = r % len(modes)
        order = modes[k:] + modes[:k]                    # each mode in each position in turn
        for mode in order if r % 2 == 0 else order[::-1]:
            res = await phase(url, pid, args.phase_s, args, POLL_MODES[mode], cursor)
            res.update(round=r, mode=mode)
            print(f"round {r} {mode:7}: {res['out_tok_s']:7.1f} out tok/s, ttft p99 {res['ttft_p99_ms']:6.1f} "
                  f"ms, itl p99 {res['itl_p99_ms']:6.1f} ms", flush=True)
            phases.append(res)
    return phases, idle_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the JSON here (also printed)")
    ap.add_argument("--rounds", type=int, default=4, help="each round runs one phase of each mode")
    ap.add_argument("--phase-s", type=float, default=15.0)
    ap.add_argument("--warmup-s", type=float, default=8.0)
    ap.add_argument("--idle-s", type=float, default=10.0, help="each idle measurement (no chats)")
    ap.add_argument("--modes", default="off,page", help="comma-separated, 'off' first, of: " + ", ".join(
        f"{m} ({' + '.join(v) or 'no polling'})" for m, v in POLL_MODES.items()))
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "off" or len(set(modes)) != len(modes) or not set(modes) <= set(POLL_MODES):
        ap.error(f"--modes must start with 'off' and name distinct modes of {sorted(POLL_MODES)}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dashboard-cost-") as tmp:
        proc, url = start_server(Path(tmp), args)
        try:
            phases, idle_cpu = asyncio.run(run(url, proc.pid, args, modes))
            points = len(httpx.get(url + "/dashboard/data", timeout=30).json()["series"].get("t", []))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    result = {"benchmark": "dashboard_cost", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "machine": f"CPU, {os.cpu_count()} cores", "args": vars(args),
              "polled": {m: POLL_MODES[m] for m in modes},
              "dashboard_points_at_end": points, "loadavg_1_5_15": {"before": load_before,
                                                                       "after": os.getloadavg()},
              "idle_server_cpu": idle_cpu, **compare(phases, modes),
              "phases": [{k: v for k, v in p.items() if k != "samples"} for p in phases]}
    text = json.dumps(result, indent=2)
    print(json.dumps({k: result[k] for k in ("idle_server_cpu", "modes", "ratio_vs_off", "paired_median_vs_off",
                                             "off_out_tok_s_spread", "loadavg_1_5_15")}, indent=2))
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
