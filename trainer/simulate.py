"""`alchemist simulate`: simulated users chat with a running server, a deterministic rater rates each
answer, the ratings go to `POST /feedback`, and the positive rate is drawn over time (curve.png).

Raters (pure functions of the answer text, +1 or -1):
- `concise` (default): +1 if the answer has at most 30 words (whitespace split). SmolLM2-135M-Instruct
  rarely stops early -- most answers run into `max_tokens` -- but sometimes answers in a line, so
  there are positives to learn from and a clear direction (stop sooner) to learn.
- `complete`: +1 if the answer ends like a finished sentence (`.`, `!`, `?`, optionally followed by a
  closing quote/bracket, or a closing code fence), i.e. it was not cut off at `max_tokens`.

Base rates measured 2026-11-28 against `alchemist serve` (embedded SmolLM2-135M-Instruct, CPU) with
this module's settings: the built-in prompts, temperature 0.7, max_tokens 64, per-event seeds,
160 answers (two seeded passes over the 80 prompts). Share of answers with <= N words:
N=20 0.11, N=25 0.175, N=30 0.19, N=35 0.24, N=40 0.31 (word counts jump from 25 to 32, so 30 sits
in a gap); `concise` (N=30) base rate 0.19; `complete` base rate 0.25 (finish_reason "stop": 0.24).

Output in --out: events.jsonl (one line per event in completion order; `index` is the event number),
metrics.jsonl (periodic /metrics scrapes), curve.png, summary.json; the last stdout line is the
summary as JSON.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from common.errors import ConfigError
from trainer.prompts import PROMPTS, prompt_order
from trainer.simulate_report import parse_metrics, plot, positive_rate, reuse_hit_rate, train_tokens

CONCISE_MAX_WORDS = 30
_FINISHED = re.compile(r"([.!?][\"')\]*]*|```)$")


def rate(text: str) -> int:
    """The `concise` rater: +1 for an answer of at most CONCISE_MAX_WORDS words, else -1."""
    return 1 if len(text.split()) <= CONCISE_MAX_WORDS else -1


def rate_complete(text: str) -> int:
    """The `complete` rater: +1 if the answer ends like a finished sentence (not cut off), else -1."""
    return 1 if _FINISHED.search(text.rstrip()) else -1


RATERS = {"concise": rate, "complete": rate_complete}
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulated users chat, rate answers, post feedback; draw the curve")
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--events", type=int, required=True, help="chat completions (each rated once)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--api-key", default="sk-simulate", help="bearer key (any key when auth is off)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="prompt order and per-event sampling seeds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="1.0: training on samples drawn below 1 sharpens the model (held-out perplexity rises)")
    p.add_argument("--window", type=int, default=50, help="events in the rolling positive rate")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--rater", choices=sorted(RATERS), default="concise")
    p.add_argument("--log-every", type=int, default=25, help="events between progress lines")
    p.add_argument("--scrape-every", type=float, default=5.0, help="seconds between /metrics scrapes")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request")


def main(args) -> int:
    summary = asyncio.run(Simulation(args).run())
    print(json.dumps(summary), flush=True)
    return 1 if summary["events"] and summary["errors"] == summary["events"] else 0


# -- metrics --------------------------------------------------------------------------------------

# -- the run --------------------------------------------------------------------------------------

class Simulation:
    def __init__(self, args):
        self.args = args
        self.root = args.base_url.rstrip("/").removesuffix("/v1")
        self.out = Path(args.out)
        self.rater = RATERS[args.rater]
        self.order = prompt_order(args.seed, args.events)
        self.records: list[dict] = []           # completion order
        self.scrapes: list[dict] = []
        self.next_index = 0
        self.t0 = time.monotonic()

    async def run(self) -> dict:
        import httpx
        from openai import AsyncOpenAI
        self.out.mkdir(parents=True, exist_ok=True)
        headers = {"Authorization": f"Bearer {self.args.api_key}"}
        async with httpx.AsyncClient(base_url=self.root, headers=headers, timeout=300) as http:
            self.http = http
            self.chat = AsyncOpenAI(base_url=self.root + "/v1", api_key=self.args.api_key, max_retries=0,
                                    timeout=600)
            self.model = self.args.model or await self._default_model()
            with open(self.out / "events.jsonl", "w") as self.events_file:
                scraper = asyncio.create_task(self._scrape_loop())
                await asyncio.gather(*(self._worker() for _ in range(max(1, self.args.concurrency))))
                scraper.cancel()
                await asyncio.gather(scraper, return_exceptions=True)
            await self._scrape()
            await self.chat.close()
        summary = self._summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in self.scrapes))
        plot(self.out / "curve.png", [r["rating"] for r in self.records if r["rating"] is not None],
             self.args.window, self.scrapes, self.args.rater, 0.9 * self.args.scrape_every)
        return summary

    async def _default_model(self) -> str:
        try:
            r = await self._with_retries(lambda: self.http.get("/v1/models"))
            return r.json()["data"][0]["id"]
        except Exception as exc:
            raise ConfigError(f"simulate: cannot list models at {self.root}/v1/models ({exc}); "
                              "is the server up? (or pass --model)") from exc

    async def _worker(self) -> None:
        while self.next_index < self.args.events:
            index, self.next_index = self.next_index, self.next_index + 1
            record = await self._event(index)
            self.records.append(record)
            self.events_file.write(json.dumps(record) + "\n")
            self.events_file.flush()
            if self.args.log_every > 0 and len(self.records) % self.args.log_every == 0:
                await self._scrape()
                print(self._progress(), flush=True)

    async def _event(self, index: int) -> dict:
        prompt = self.order[index]
        record = {"index": index, "prompt_index": prompt, "category": PROMPTS[prompt][0], "id": None,
                  "response": None, "rating": None, "feedback_id": None, "feedback_status": None,
                  "adapter_version": None, "finish_reason": None, "error": None}
        try:
            resp = await self._with_retries(lambda: self.chat.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": PROMPTS[prompt][1]}],
                temperature=self.args.temperature, max_tokens=self.args.max_tokens,
                seed=self.args.seed * 1_000_000 + index))
            choice = resp.choices[0]
            text = choice.message.content or ""
            record.update(id=resp.id, response=text, rating=self.rater(text),
                          finish_reason=choice.finish_reason,
                          adapter_version=(resp.model_extra or {}).get("adapter_version"))
            r = await self._with_retries(lambda: self.http.post("/feedback", json={
                "id": resp.id, "choice_index": 0, "rating": record["rating"]}))
            record["feedback_status"] = r.status_code      # 409: an earlier attempt was committed
            record["feedback_id"] = r.json().get("feedback_id") if r.status_code < 300 else None
        except Exception as exc:                       # counted as an error; the run goes on
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        record["time"] = time.time()
        return record

    async def _with_retries(self, call):
        """`call()` (an awaitable factory) with retries on transport errors and 408/429/5xx."""
        for attempt in range(self.args.retries + 1):
            try:
                result = await call()
                status = getattr(result, "status_code", 200)
                if status < 400 or status == 409:
                    return result
                error = RuntimeError(f"HTTP {status}: {result.text[:200]}")
            except Exception as exc:
                status, error = getattr(exc, "status_code", None), exc
            if (status is not None and status not in RETRYABLE_STATUS) or attempt == self.args.retries:
                raise error
            await asyncio.sleep(0.5 * 2 ** attempt)

    async def _scrape_loop(self) -> None:
        while True:
            await self._scrape()
            await asyncio.sleep(self.args.scrape_every)

    async def _scrape(self) -> None:
        try:
            r = await self.http.get("/metrics", timeout=30)
            metrics = parse_metrics(r.text) if r.status_code == 200 else {}
        except Exception:                              # metrics are optional
            metrics = {}
        if metrics:
            self.scrapes.append({"t": round(time.monotonic() - self.t0, 3), "events": len(self.records),
                                 **metrics})

    def _progress(self) -> str:
        ratings = [r["rating"] for r in self.records if r["rating"] is not None]
        recent = ratings[-self.args.window:]
        rate_text = f"{positive_rate(recent):.3f}" if recent else "n/a"
        parts = [f"[{time.monotonic() - self.t0:7.1f}s] events {len(self.records)}/{self.args.events}",
                 f"positive(last {len(recent)}) {rate_text}",
                 f"errors {sum(r['error'] is not None for r in self.records)}"]
        m = self.scrapes[-1] if self.scrapes else {}
        if "adapter_version" in m:
            parts.append(f"adapter v{int(m['adapter_version'])}")
        if "train_steps" in m:
            parts.append(f"steps {int(m['train_steps'])}")
        if "tokens" in m:
            parts.append("train tok " + " ".join(f"{k}={int(v)}" for k, v in sorted(m["tokens"].items())))
        if reuse_hit_rate(m) is not None:
            parts.append(f"reuse hit {reuse_hit_rate(m):.2f}")
        return "  ".join(parts)

    def _summary(self) -> dict:
        by_index = sorted(self.records, key=lambda r: r["index"])
        ratings = [r["rating"] for r in by_index if r["rating"] is not None]
        w, last = self.args.window, self.scrapes[-1] if self.scrapes else {}
        return {"initial_rate": positive_rate(ratings[:w]), "final_rate": positive_rate(ratings[-w:]),
                "events": len(self.records), "rated": len(ratings),
                "feedback_accepted": sum(r["feedback_status"] in (200, 201, 409) for r in self.records),
                "errors": sum(r["error"] is not None for r in self.records),
                "elapsed_s": round(time.monotonic() - self.t0, 3), "window": w, "rater": self.args.rater,
                "overall_rate": positive_rate(ratings), "reuse_hit_rate": reuse_hit_rate(last),
                "train_tokens": train_tokens(last), "train_steps": last.get("train_steps"),
                "adapter_version": last.get("adapter_version"), "model": self.model, "out": str(self.out)}
