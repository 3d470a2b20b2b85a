"""What the dashboard and the metrics cost serving (issue 19): a live `alchemist serve` (a tiny random
Llama on the CPU, online training on, no ratings) under a closed-loop streaming chat load, measured in
alternating phases without and with a client that polls GET /dashboard/data and GET /metrics every
second (a dashboard open at a 1 s refresh plus a 1 s Prometheus scrape: harsher than the page's 3 s and
compose's 5 s). Rounds go ABBA (off on, on off, ...) so a drift cancels; the server's own dashboard
sampler (every `dashboard_interval_s`) runs in both. Reports each mode's throughput and latency and the
ratio on / off, with the spread of the off phases among themselves as the noise to compare it with,
and the server process's CPU time (/proc/PID/stat: every thread) per output token in each mode and per
second while idle with and without polling: on a shared machine CPU time is steadier than throughput.

/dashboard/data is polled as the page asks for it (`--poll page`: the whole history once, then
`?since=` the newest point seen) or the whole history every second (`--poll full`).

    python -m benchmarks.dashboard_cost --out FILE [--rounds 4 --phase-s 15 --concurrency 4 --poll page]
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
POLLED = ("/dashboard/data", "/metrics")


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


async def poll(client: httpx.AsyncClient, stop: asyncio.Event, out: dict, cursor: dict | None) -> None:
    """GET each POLLED path once a second until `stop`; keeps each answer's latency and size. With a
    `cursor` (the page's way, kept across phases as an open page keeps it) /dashboard/data asks only for
    the points after the newest seen; without one, the whole history every time."""
    while not stop.is_set():
        tick = time.perf_counter()
        for path in POLLED:
            since = cursor.get("t") if cursor is not None and path == "/dashboard/data" else None
            t = time.perf_counter()
            r = await client.get(path, params={} if since is None else {"since": since})
            if r.status_code != 200:
                raise RuntimeError(f"{path} answered {r.status_code}")
            out[path]["s"].append(time.perf_counter() - t)
            out[path]["bytes"].append(len(r.content))
            if cursor is not None and path == "/dashboard/data" and r.json()["series"].get("t"):
                cursor["t"] = r.json()["series"]["t"][-1]
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.perf_counter() - tick)))
        except asyncio.TimeoutError:
            pass


async def idle(url: str, pid: int, seconds: float, polling: bool, cursor: dict | None) -> dict:
    """No chats for `seconds`, polled or not: the server's CPU time per second."""
    polls = {p: {"s": [], "bytes": []} for p in POLLED}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        stop = asyncio.Event()
        poller = asyncio.create_task(poll(client, stop, polls, cursor)) if polling else None
        cpu, start = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(seconds)
        res = {"cpu_ms_per_s": (cpu_seconds(pid) - cpu) * 1e3 / (time.perf_counter() - start)}
        stop.set()
        if poller is not None:
            await poller
            res["polls"] = {p: len(v["s"]) for p, v in polls.items()}
    return res


async def phase(url: str, pid: int, seconds: float, concurrency: int, max_tokens: int,
                polling: bool, cursor: dict | None) -> dict:
    """`concurrency` clients chat back to back for `seconds` (the last chats finish after it)."""
    out = {"ttft": [], "itl": [], "e2e": [], "tokens": 0}
    polls = {p: {"s": [], "bytes": []} for p in POLLED}
    deadline = time.perf_counter() + seconds
    counter = iter(range(10 ** 9))
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            while time.perf_counter() < deadline:
                await one_chat(client, next(counter), max_tokens, out)
        stop = asyncio.Event()
        poller = asyncio.create_task(poll(client, stop, polls, cursor)) if polling else None
        cpu, start = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        out["cpu_s"] = cpu_seconds(pid) - cpu
        stop.set()
        if poller is not None:
            await poller
    return summarize(out, elapsed, polls if polling else None)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(out: dict, elapsed: float, polls: dict | None) -> dict:
    res = {"seconds": elapsed, "requests": len(out["e2e"]), "out_tok_s": out["tokens"] / elapsed,
           "req_s": len(out["e2e"]) / elapsed, "tokens": out["tokens"], "server_cpu_s": out["cpu_s"],
           "cpu_ms_per_token": out["cpu_s"] * 1e3 / max(1, out["tokens"]),
           "samples": {k: out[k] for k in ("ttft", "itl", "e2e")}}
    for key in ("ttft", "itl", "e2e"):
        res[f"{key}_p50_ms"] = pct(out[key], 0.5) * 1e3
        res[f"{key}_p99_ms"] = pct(out[key], 0.99) * 1e3
    if polls is not None:
        res["polls"] = {p: {"count": len(v["s"]), "p50_ms": pct(v["s"], 0.5) * 1e3,
                            "max_ms": max(v["s"]) * 1e3, "bytes_last": v["bytes"][-1]}
                        for p, v in polls.items() if v["s"]}
    return res


LATENCY_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms")


def compare(phases: list[dict]) -> dict:
    """Per mode: throughput as the median over its phases, latency percentiles over all its samples;
    the ratio on / off of each; paired per-round throughput ratios; the off phases' own spread."""
    modes = {}
    for mode in ("off", "on"):
        mine = [p for p in phases if p["mode"] == mode]
        pooled = {k: [x for p in mine for x in p["samples"][k]] for k in ("ttft", "itl", "e2e")}
        row = {"phases": len(mine), "requests": sum(p["requests"] for p in mine),
               "out_tok_s": statistics.median(p["out_tok_s"] for p in mine),
               "req_s": statistics.median(p["req_s"] for p in mine),
               "server_cpu_ms_per_out_token": 1e3 * sum(p["server_cpu_s"] for p in mine)
               / sum(p["tokens"] for p in mine)}
        for key in LATENCY_KEYS:
            name, q = key.split("_")[0], 0.5 if "_p50_" in key else 0.99
            row[key] = pct(pooled[name], q) * 1e3
        modes[mode] = row
    ratio = {k: modes["on"][k] / modes["off"][k]
             for k in ("out_tok_s", "req_s", "server_cpu_ms_per_out_token", *LATENCY_KEYS)}
    paired = {key: paired_ratios(phases, key) for key in ("out_tok_s", "cpu_ms_per_token")}
    off = [p["out_tok_s"] for p in phases if p["mode"] == "off"]
    return {"modes": modes, "ratio_on_off": ratio,
            "paired_out_tok_s_ratio": paired["out_tok_s"], "paired_cpu_per_token_ratio": paired["cpu_ms_per_token"],
            "paired_median": {k: statistics.median(v) for k, v in paired.items()},
            "off_out_tok_s_spread": max(off) / min(off)}


def paired_ratios(phases: list[dict], key: str) -> list[float]:
    """on / off of `key` within each round (its two phases ran back to back)."""
    def of(r, mode):
        return next(p[key] for p in phases if p["round"] == r and p["mode"] == mode)
    return [of(r, "on") / of(r, "off") for r in sorted({p["round"] for p in phases})]


async def run(url: str, pid: int, args) -> tuple[list[dict], dict]:
    cursor = {} if args.poll == "page" else None
    idle_cpu = {mode: await idle(url, pid, args.idle_s, mode == "on", cursor) for mode in ("off", "on")}
    print(f"idle: server CPU {idle_cpu['off']['cpu_ms_per_s']:.1f} ms/s unpolled, "
          f"{idle_cpu['on']['cpu_ms_per_s']:.1f} ms/s polled", flush=True)
    await phase(url, pid, args.warmup_s, args.concurrency, args.max_tokens, True, cursor)   # warm-up, dropped
    phases = []
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")                           # ABBA
        for mode in order:
            res = await phase(url, pid, args.phase_s, args.concurrency, args.max_tokens, mode == "on", cursor)
            res.update(round=r, mode=mode)
            print(f"round {r} {mode:3}: {res['out_tok_s']:7.1f} out tok/s, ttft p99 {res['ttft_p99_ms']:6.1f} "
                  f"ms, itl p99 {res['itl_p99_ms']:6.1f} ms", flush=True)
            phases.append(res)
    return phases, idle_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the JSON here (also printed)")
    ap.add_argument("--rounds", type=int, default=4, help="each round is one off and one on phase")
    ap.add_argument("--phase-s", type=float, default=15.0)
    ap.add_argument("--warmup-s", type=float, default=8.0)
    ap.add_argument("--idle-s", type=float, default=10.0, help="each idle measurement (no chats)")
    ap.add_argument("--poll", choices=("page", "full"), default="page",
                    help="page: /dashboard/data?since= the newest point seen, as the page asks; full: the "
                         "whole history every second")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dashboard-cost-") as tmp:
        proc, url = start_server(Path(tmp), args)
        try:
            phases, idle_cpu = asyncio.run(run(url, proc.pid, args))
            points = len(httpx.get(url + "/dashboard/data", timeout=30).json()["series"].get("t", []))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    result = {"benchmark": "dashboard_cost", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "machine": f"CPU, {os.cpu_count()} cores", "args": vars(args), "polled": list(POLLED),
              "dashboard_points_at_end": points, "loadavg_1_5_15": {"before": load_before,
                                                                       "after": os.getloadavg()},
              "idle_server_cpu": idle_cpu, **compare(phases),
              "phases": [{k: v for k, v in p.items() if k != "samples"} for p in phases]}
    text = json.dumps(result, indent=2)
    print(json.dumps({k: result[k] for k in ("idle_server_cpu", "modes", "ratio_on_off", "paired_median",
                                             "off_out_tok_s_spread", "loadavg_1_5_15")}, indent=2))
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
