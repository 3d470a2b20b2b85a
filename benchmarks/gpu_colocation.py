"""Co-location on one GPU (DESIGN §6, issue 5): TTFT/TBT p50/p99 at a fixed ShareGPT request rate
(`--load` x measured capacity, Poisson, seeded) with online training off vs on, in one run on one
engine, and the training throughput reached meanwhile. Target: TBT p99 on <= 1.2x off.

The engine is the server's: random weights of the shape, capture=prefill, LoRA applied by the same
ServerState that `alchemist serve` builds (training enabled). This thread drives it like the server's
engine thread (on the serving stream): add the requests that have arrived, run the server's step hooks
(queue stamp, then in `interleaved` mode OnlineTrainer.step: a training step with its duty cycle; in
`thread` mode the trainer thread trains on its low-priority stream and offers versions), engine.step()
(which first makes the newest offered version live), stamp new tokens. Completions are recorded (and, in the `on` runs,
30% rated +1/-1, seeded) on a writer thread, like the server's `asyncio.to_thread`; a rating pins the
record's activations as POST /feedback does. Order: capacity, `off` (adapter kept, trainer hook runs,
no feedback: no steps), then per `--modes` entry (concurrency:duty_cycle) one warm-up step and an `on`
run of the same schedule.

    python -m benchmarks.gpu_colocation --out DIR [--sharegpt .bench/sharegpt.json] [--shape 8b|1b|tiny]
        [--modes thread,thread:duty=0.5,thread:switch=0.1,thread:sms=0.5,interleaved,burn-python]
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.colocation_loads import Burn, drain_backlog, summarize, use_mode
from benchmarks.colocation_standalone import standalone
from benchmarks.colocation_workload import RatingQueue, load_workload, params, schedule
from benchmarks.common import emit, git_commit
from benchmarks.gpu_serving import DEVICE, make_engine
from benchmarks.gpu_training import SHAPES
from engine.async_engine import AsyncEngine
from store.feedback_store import CompletionRecord, FeedbackStore
from trainer.config import TrainerConfig

KV_GIB = {"8b": 24.0, "1b": 16.0, "tiny": 0.0625}


def build(args, tmp: Path):
    """Engine + the server's state around it (LoRA applied, trainer built, step hooks registered)."""
    engine = make_engine(SHAPES[args.shape], args.kv_gib or KV_GIB[args.shape], capture="prefill",
                         activation_pool_cpu_bytes=int(args.pool_cpu_gib * (1 << 30)),
                         **({"activation_pool_bytes": int(args.pool_gib * (1 << 30))} if args.pool_gib else {}))
    training = TrainerConfig(objective=args.objective, step_tokens=args.step_tokens,
                             checkpoint_every=args.checkpoint_every, min_records_per_step=args.min_records,
                             max_wait_s=args.max_wait_s, compile_layers=args.compile_layers,
                             token_buckets=args.token_buckets, cuda_graphs=args.cuda_graphs,
                             reuse=not args.no_reuse)
    async_engine = AsyncEngine(engine)         # never started: this thread is the engine thread
    store = FeedbackStore(tmp / "alchemist.db")
    try:
        from server.config import ServerConfig
        from server.state import ServerState
    except ImportError:                        # no web stack (the GPU machine): the same trainer hook
        return engine, TrainerOnly(training, engine, store, tmp / "run", async_engine.step_hooks), \
            async_engine.step_hooks
    config = ServerConfig(engine=engine.config, training=training)
    state = ServerState(config, async_engine, store, run_dir=tmp / "run")
    return engine, state, async_engine.step_hooks


class TrainerOnly:
    """What ServerState adds for training, without the web stack: the OnlineTrainer on the engine's
    step hooks in interleaved mode (the same `step` the server's hook calls)."""

    def __init__(self, training, engine, store, run_dir: Path, step_hooks: list):
        from trainer.online import OnlineTrainer
        self.store = store
        self.trainer = OnlineTrainer(training, engine.training_port(), store, run_dir,
                                     base_model=engine.config.model)
        if self.trainer.thread is None:
            step_hooks.append(self.trainer.step)

    @property
    def train_error(self) -> str | None:
        return self.trainer.last_error


def capacity(engine, workload, n: int) -> dict:
    """Closed loop: n requests at once (after a warm-up batch); completed requests per second."""
    engine.generate([p for p, _ in workload[:8]], [params(m) for _, m in workload[:8]])
    batch = [workload[i % len(workload)] for i in range(n)]
    t = time.perf_counter()
    seqs = engine.generate([p for p, _ in batch], [params(m) for _, m in batch])
    secs = time.perf_counter() - t
    out = sum(len(s[0].output_token_ids) for s in seqs)
    return {"requests": n, "seconds": secs, "req_s": n / secs, "out_tok_s": out / secs, "seqs": seqs}


class Writer:
    """Off the engine thread, as the server does: record each finished completion; rate some."""

    def __init__(self, state):
        self.state, self.pool = state, ThreadPoolExecutor(max_workers=1)
        self.futures = []

    def finished(self, seq, rating: int | None) -> None:
        rec = CompletionRecord(*seq.record_key, list(seq.prompt_token_ids), list(seq.output_token_ids),
                               list(seq.logprobs), seq.adapter_version, None, time.time(), seq.finish_reason)
        self.futures.append(self.pool.submit(self._write, rec, rating))

    def rate(self, key: tuple[str, int], rating: int) -> None:
        """A rating that comes later than its answer (the completion was recorded when it ended)."""
        self.futures.append(self.pool.submit(self._rate, *key, rating))

    def _write(self, rec: CompletionRecord, rating: int | None) -> None:
        self.state.store.record_completions([rec])
        if rating is not None:
            self._rate(rec.response_id, rec.choice_index, rating)

    def _rate(self, response_id: str, choice_index: int, rating: int) -> None:
        """What POST /feedback does."""
        self.state.store.add_feedback(response_id=response_id, choice_index=choice_index, rating=rating)
        self.state.trainer.pin_for_feedback(response_id, choice_index)

    def drain(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []


def drive(engine, hooks, sched: list[dict], duration: float, writer: Writer, tag: str, with_feedback: bool,
          trainer, rating_wait_s: float = 0.0) -> dict:
    """Open loop on this thread until every request has finished; times in s from the start. Each
    prompt's first id is salted per run, so no request hits another's prefix cache (KV state of the
    previous run or a repeat of the same record)."""
    tokens: dict[str, list[float]] = {}          # request id -> time of each output token
    ids = [f"{tag}-{i}" for i in range(len(sched))]
    salt, vocab = random.Random(tag), engine.hf_config.vocab_size
    rating = {r: s["rating"] if with_feedback else None for r, s in zip(ids, sched)}
    delay = {r: s.get("delay") or 0.0 for r, s in zip(ids, sched)}
    later = RatingQueue()                        # ratings that come after their answer ended
    i, t0, window_totals, next_print, backlog = 0, time.perf_counter(), None, 10.0, None
    steps = []                                   # (start s, end s, prompt tokens, a training step was under way)
    now = 0.0
    while now < duration or engine.has_unfinished() or (later and now < duration + rating_wait_s):
        for key, value in later.due(now):
            writer.rate(key, value)
        while i < len(sched) and sched[i]["t"] <= now:
            prompt = [salt.randrange(vocab)] + sched[i]["prompt"][1:]
            engine.add_request(ids[i], prompt, params(sched[i]["max_tokens"], sched[i]["capture"]))
            tokens[ids[i]] = []
            i += 1
        for hook in hooks:                       # what the server's engine thread runs between steps
            hook()
        if window_totals is None and now >= duration:
            window_totals = Counter(trainer.totals)
            backlog = trainer.keep_up.snapshot(trainer.read_seq)     # rated, not yet taken into a step
        if not engine.has_unfinished():
            nxt = min(t for t in (sched[i]["t"] if i < len(sched) else duration, later.next_due()) if t is not None)
            time.sleep(min(max(nxt - now, 0.0), 0.5))
        else:
            start = time.perf_counter()
            deltas = engine.step()               # returns after the step's host sync
            t = time.perf_counter() - t0
            steps.append((start - t0, t, engine.step_signal.last_prefill_tokens, trainer.lock.locked()))
            for d in deltas:
                tokens[d.request_id].extend([t] * len(d.token_ids))
                if d.finished:
                    value = rating[d.request_id]
                    if value is not None and delay[d.request_id] > 0:
                        writer.finished(d.seq, None)
                        later.push(t + delay[d.request_id], d.seq.record_key, value)
                    else:
                        writer.finished(d.seq, value)
        now = time.perf_counter() - t0
        if now >= next_print:
            next_print += 10.0
            print(f"[{tag}] t {now:.0f}s arrived {i} running {len(engine.scheduler.running)} waiting "
                  f"{len(engine.scheduler.waiting)} train steps {trainer.totals['steps']}", flush=True)
    return {"tokens": tokens, "arrivals": {r: s["t"] for r, s in zip(ids, sched)}, "elapsed_s": now, "steps": steps,
            "rated": sum(v is not None for v in rating.values()), "ratings_never_sent": len(later),
            "window_totals": window_totals if window_totals is not None else Counter(trainer.totals),
            "backlog_at_window_end": backlog or trainer.keep_up.snapshot(trainer.read_seq),
            "final_totals": Counter(trainer.totals)}


def warm_up_training(state, hooks, engine, workload, writer: Writer) -> None:
    """Training steps (kernels, allocator, the mode's stream) on 4 fresh requests, until no feedback is
    left untrained and no step is under way, so that the next run starts clean."""
    for seqs in engine.generate([p for p, _ in workload[:4]], [params(m) for _, m in workload[:4]]):
        writer.finished(seqs[0], 1)
    writer.drain()
    trainer = state.trainer
    steps = trainer.totals["steps"]
    drain_backlog(state, hooks, timeout=600)
    if state.train_error or trainer.totals["steps"] <= steps:
        raise RuntimeError(f"warm-up training failed: {state.train_error}")


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        engine, state, hooks = build(args, Path(tmp))
        if engine.runner.stream is not None:   # this thread is the engine thread: the serving stream
            torch.cuda.set_stream(engine.runner.stream)
        print(f"{args.shape} engine + LoRA ready in {time.perf_counter() - t:.1f} s; activation pool holds "
              f"{engine.activation_pool.num_slots} tokens", flush=True)
        workload = load_workload(args.sharegpt, engine.hf_config.vocab_size)
        cap = capacity(engine, workload, args.capacity_requests)
        cap.pop("seqs")
        writer = Writer(state)
        res = {"capacity": cap, "loads": {}}
        use_mode(state.trainer, next((m for m in args.modes if not m.startswith("burn-")), "interleaved"))
        warm_up_training(state, hooks, engine, workload, writer)
        if not args.no_gc_freeze:
            gc.freeze()                          # as the server does before it serves
        try:
            for load in args.load:
                res["loads"][str(load)] = one_load(args, load, cap, engine, state, hooks, workload, writer)
            if args.standalone_records:
                res["standalone"] = standalone(args, engine, state, hooks, workload, writer)
        finally:
            state.trainer.stop()
            state.store.close()
    for per_load in res["loads"].values():
        for tag, out in per_load.items():
            if tag.startswith("on ") and "burn-" not in tag and "standalone" in res:
                out["trained_share_of_standalone"] = out["trained_tok_s"] / res["standalone"]["own_recompute_tok_s"]
    return res


def one_load(args, load: float, cap: dict, engine, state, hooks, workload, writer) -> dict:
    """`off` and one `on` run per mode, all of one seeded schedule at `load` x capacity."""
    rate = load * cap["req_s"]
    print(f"capacity {cap['req_s']:.2f} req/s ({cap['out_tok_s']:.0f} out tok/s); open loop at {rate:.2f} req/s "
          f"(load {load})", flush=True)
    sched = schedule(workload, rate, args.duration, args.seed, args.feedback, args.opt_in, args.rating_delay)
    res = {"rate_req_s": rate, "scheduled_requests": len(sched)}
    runs = [("off", None)] + [(f"on {mode}", mode) for mode in args.modes]
    for tag, mode in runs:
        burn = None
        if mode is None:                                      # earlier runs' ratings trained before `off`
            drain_backlog(state, hooks)
        if mode is not None and mode.startswith("burn-"):   # a synthetic load, no training
            burn = Burn.from_mode(mode, engine.device, engine.hf_config.hidden_size)
        elif mode is not None:
            use_mode(state.trainer, mode)
            warm_up_training(state, hooks, engine, workload, writer)
        res[tag] = one_run(engine, hooks, sched, args, writer, tag, state, burn, salt=f"load{load}")
    for tag, _ in runs[1:]:
        res[tag]["ratio_on_off"] = {k: res[tag][k] / res["off"][k] for k in
                                    ("ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms")}
        res[tag]["tbt_p99_target_met"] = res[tag]["ratio_on_off"]["tbt_p99_ms"] <= 1.2
    return res


class GcPauses:
    """The garbage collector's pauses during a run (it holds the GIL for each), per generation."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._start: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))
            self._start = None

    def summary(self) -> dict:
        out = {}
        for gen in sorted({g for g, _ in self.pauses}):
            ms = [s * 1e3 for g, s in self.pauses if g == gen]
            out[str(gen)] = {"count": len(ms), "max_ms": max(ms), "total_ms": sum(ms)}
        return out


def reuse_flops_share(totals: Counter, layout) -> dict:
    """Forward-projection FLOPs that reuse skipped (rows injected from the device or host tier, per
    kind) over those that unlimited prefill capture would have skipped for the same trained records
    (every prompt row of every layer and kind)."""
    flops = {kind: 2.0 * layout.input_dims[kind] * dim for kind, dim in layout.dims.items()}
    rows = {key[len("pool_rows_"):]: n for key, n in totals.items() if key.startswith("pool_rows_")}
    skipped = {tier: sum(n * flops[k.split("/")[1]] for k, n in rows.items() if k.startswith(tier + "/"))
               for tier in ("device", "retained", "cpu")}
    ideal = totals["served_prompt_rows"] * layout.num_layers * sum(flops.values())
    share = lambda x: x / ideal if ideal else 0.0
    return {"share": share(sum(skipped.values())), "from_device": share(skipped["device"]),
            "from_retained": share(skipped["retained"]), "from_host": share(skipped["cpu"]), "rows": rows,
            "ideal_tflops": ideal / 1e12}


def one_run(engine, hooks, sched, args, writer: Writer, tag: str, state, burn=None, salt: str = "") -> dict:
    duration = args.duration
    before, staleness = Counter(state.trainer.totals), Counter(state.trainer.staleness)
    on = tag != "off" and burn is None
    if burn is not None:                         # the load instead of training (earlier runs' ratings wait)
        state.trainer.pause()
        burn.start()
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        raw = drive(engine, hooks, sched, duration, writer, f"{tag.replace(' ', '-')}-{salt}", on, state.trainer,
                    args.rating_wait_s)
    finally:
        gc.callbacks.remove(pauses)
        if burn is not None:
            burn.stop()
            state.trainer.resume()
    out = summarize(raw, duration, before)
    out.update(gc_pauses=pauses.summary(), ratings_never_sent=raw["ratings_never_sent"])
    if burn is not None:
        out["burn_busy_frac"] = burn.busy_s / raw["elapsed_s"]
    writer.drain()
    if on:
        untrained = len(state.store.pending_feedback(state.trainer.read_seq, 1 << 30))   # when serving ended
        drain_backlog(state, hooks)              # the run's late ratings trained too (serving idle)
        out["reuse_flops_share"] = reuse_flops_share(Counter(state.trainer.totals) - before, engine.activation_pool.layout)
        backlog = raw["backlog_at_window_end"]
        out.update(backlog_at_window_end=backlog,
                   backlog_fits_one_step=backlog["backlog_tokens"] <= args.step_tokens
                   and backlog["backlog_ratings"] <= state.trainer.config.max_records_per_step,
                   staleness={str(k): n for k, n in sorted((state.trainer.staleness - staleness).items())},
                   latency_budget=state.trainer.status()["latency_budget"],
                   untrained_feedback=untrained,
                   train_error=state.train_error, adapter_version=state.trainer.version,
                   pool=engine.activation_pool.stats(), pool_capacity_tokens=engine.activation_pool.num_slots,
                   trainer_sms=state.trainer.thread.sms if state.trainer.thread is not None else None)
    print(tag, json.dumps(out), flush=True)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sharegpt", default=".bench/sharegpt.json")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--duration", type=float, default=60.0, help="s of Poisson arrivals per run")
    ap.add_argument("--load", type=lambda v: [float(x) for x in v.split(",")], default=[0.5],
                    help="request rates as shares of measured capacity, e.g. 0.25,0.5,0.75: off + on runs each")
    ap.add_argument("--standalone-records", type=int, default=32,
                    help="records trained with no serving traffic at the end: own recompute vs the server's "
                         "trainer (0: skip)")
    ap.add_argument("--capacity-requests", type=int, default=128)
    ap.add_argument("--feedback", type=float, default=0.3, help="share of answers rated in the `on` run")
    ap.add_argument("--opt-in", action="store_true",
                    help="capture only the requests that will be rated (request `capture`), in `off` and `on`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rating-delay", default="lognormal:20:120",
                    help="when a rating comes after its answer ends: none, or lognormal:MEDIAN:P90 (s)")
    ap.add_argument("--rating-wait-s", type=float, default=180.0,
                    help="after the arrival window, keep serving nothing and posting ratings this long at most")
    ap.add_argument("--objective", default="kto", help="kto: every +1/-1 rating trains (sft: only +1)")
    ap.add_argument("--modes", type=lambda v: v.split(","), default=["thread", "thread:duty=0.5"],
                    help="`on` runs, each concurrency[:duty=D][:yield=N|none][:sms=F|none][:switch=MS] "
                         "(concurrency: thread | interleaved; training config defaults for options left out), "
                         "or burn-gpu[:duty=D] / burn-python[:duty=D]: a synthetic load, no training "
                         "(benchmarks/colocation_loads.py)")
    ap.add_argument("--step-tokens", type=int, default=2048)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--min-records", type=int, default=TrainerConfig.min_records_per_step,
                    help="ratings a training step waits for")
    ap.add_argument("--max-wait-s", type=float, default=TrainerConfig.max_wait_s)
    ap.add_argument("--compile-layers", action="store_true",
                    help="training.compile_layers: each training layer one compiled graph (compiled at start-up)")
    ap.add_argument("--token-buckets", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="training.token_buckets, e.g. 512,1024,2048")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="training.cuda_graphs: the training layers as CUDA graphs per token bucket (captured at start-up)")
    ap.add_argument("--no-reuse", action="store_true", help="training.reuse false: every step recomputes")
    ap.add_argument("--no-gc-freeze", action="store_true", help="do not gc.freeze() after start-up")
    ap.add_argument("--kv-gib", type=float, default=None)
    ap.add_argument("--pool-gib", type=float, default=None, help="activation pool (default: the engine's)")
    ap.add_argument("--pool-cpu-gib", type=float, default=0.0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "commit": git_commit(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
           "off_means": "same engine, LoRA applied, trainer hook running, no feedback (no steps)",
           "on_means": f"same engine and trainer, {args.feedback:.0%} of answers rated +1/-1 (seeded), "
                       "trainer steps run as the run's mode (concurrency:duty_cycle) says"}
    res.update(run(args))
    emit(res, args.out, "gpu_colocation")
    for load, per_load in res["loads"].items():      # one file per load, today's keys at the top level
        one = {**{k: v for k, v in res.items() if k != "loads"}, "args": {**vars(args), "load": float(load)},
               **per_load}
        emit(one, args.out, f"gpu_colocation-seed{args.seed}-load{load}")
    return res


if __name__ == "__main__":
    main()
