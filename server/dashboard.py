"""GET /dashboard: a page served by the server itself (no CDN: hand-written SVG charts in
server/static/), refreshed every few seconds from GET /dashboard/data -- a bounded in-memory history
(a ring buffer) of points that a background task derives from the Prometheus registry every
`dashboard_interval_s` seconds. Nothing here runs per token: one registry read per interval. The page
loads the whole history once (serialized off the event loop) and then asks only for the points after
the newest it holds (`?since=t`), so an open page costs a point or two a refresh.

The page and /dashboard/data follow the /metrics auth rule (server.auth OPS_PATHS, `metrics_auth`):
a bearer key, or the key as the password of HTTP Basic auth -- a browser asks for it when the page
answers 401 and then sends it with the page's data requests. Its script and styles hold no data and
stay open.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from common.errors import InvalidRequestError
from server.memory_metrics import COMPONENTS
from server.training_metrics import REUSE_OUTCOMES, TOKEN_PATHS

log = logging.getLogger("alchemist.server")
STATIC = {"/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
          "/dashboard/app.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard/app.css": ("dashboard.css", "text/css; charset=utf-8")}
POSITIVE = {("thumbs", "1"), ("stars", "4"), ("stars", "5"), ("reward", "0..0.5"), ("reward", "0.5..1")}
SHARE_WINDOW_S = 300.0          # positive share of the ratings of the last five minutes

Snapshot = dict                 # {(sample name, ((label, value), ...) without model_name): value}


def snapshot(registry) -> Snapshot:
    """Every sample of the registry (this runs the scrape-time collectors once)."""
    out = {}
    for family in registry.collect():
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def value(snap: Snapshot, name: str, **labels) -> float | None:
    return snap.get((name, tuple(sorted(labels.items()))))


def rate(prev: Snapshot | None, cur: Snapshot, dt: float, name: str, **labels) -> float | None:
    if prev is None or dt <= 0:
        return None
    a, b = value(prev, name, **labels), value(cur, name, **labels)
    return None if a is None or b is None else max(0.0, b - a) / dt


def bucket_deltas(prev: Snapshot, cur: Snapshot, name: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count added since prev)] of histogram `name`, by bound."""
    out = []
    for (sample, labels), count in cur.items():
        if sample == name + "_bucket":
            out.append((float(dict(labels)["le"]), count - prev.get((sample, labels), 0.0)))
    return sorted(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q * n."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def ratings(snap: Snapshot) -> tuple[float, float]:
    """(all ratings, positive ratings) counted so far."""
    total = positive = 0.0
    for (sample, labels), count in snap.items():
        if sample == "alchemist_feedback_total":
            total += count
            positive += count if (dict(labels)["kind"], dict(labels)["value"]) in POSITIVE else 0.0
    return total, positive


def derive(prev: Snapshot | None, cur: Snapshot, dt: float) -> dict:
    """One point of the history from two consecutive snapshots `dt` seconds apart."""
    point = {"output_tps": rate(prev, cur, dt, "alchemist_generation_tokens_total"),
             "prompt_tps": rate(prev, cur, dt, "alchemist_prompt_tokens_total"),
             "running": value(cur, "alchemist_num_requests_running"),
             "waiting": value(cur, "alchemist_num_requests_waiting"),
             "kv_usage": value(cur, "alchemist_kv_cache_usage_perc"),
             "pending": value(cur, "alchemist_feedback_pending"),
             "backlog_tokens": value(cur, "alchemist_feedback_backlog_tokens"),
             "oldest_pending_s": value(cur, "alchemist_feedback_oldest_pending_seconds"),
             "train_tps_window": value(cur, "alchemist_train_tokens_per_second"),
             "training_paused": value(cur, "alchemist_training_paused"),
             "adapter_version": value(cur, "alchemist_adapter_version"),
             "train_loss": value(cur, "alchemist_train_loss")}
    for key, name in (("ttft", "alchemist_time_to_first_token_seconds"),
                      ("itl", "alchemist_inter_token_latency_seconds")):
        buckets = bucket_deltas(prev, cur, name) if prev is not None else []
        point[key + "_p50"] = histogram_quantile(0.5, buckets)
        point[key + "_p99"] = histogram_quantile(0.99, buckets)
    for component in COMPONENTS:
        point["mem_" + component] = value(cur, "alchemist_memory_bytes", component=component)
    for path in TOKEN_PATHS:
        point["trained_tps_" + path] = rate(prev, cur, dt, "alchemist_train_tokens_total", path=path)
    for outcome in REUSE_OUTCOMES:
        point["reuse_" + outcome] = value(cur, "alchemist_activation_reuse_total", outcome=outcome)
    total, positive = ratings(cur)
    if prev is not None and dt > 0:
        point["ratings_per_min"] = max(0.0, total - ratings(prev)[0]) * 60.0 / dt
    else:
        point["ratings_per_min"] = None
    point["_ratings"], point["_positive"] = total, positive
    return point


class DashboardHistory:
    """The ring buffer of points (at most history_s / interval_s of them) and the task filling it."""

    def __init__(self, registry, interval_s: float, history_s: float):
        self.registry, self.interval_s, self.history_s = registry, interval_s, history_s
        self.points: deque[dict] = deque(maxlen=max(2, math.ceil(history_s / interval_s)))
        self._prev: Snapshot | None = None
        self._prev_t = 0.0
        self.boot = time.time()

    def sample(self, now: float | None = None) -> dict:
        return self.add(snapshot(self.registry), time.time() if now is None else now)

    def add(self, cur: Snapshot, now: float) -> dict:
        """Append the point of snapshot `cur` (on the event loop, which also serves data())."""
        point = {k: (v if v is None or math.isfinite(v) else None)     # JSON has no NaN
                 for k, v in derive(self._prev, cur, now - self._prev_t).items()}
        point["t"] = now
        point["positive_share"] = self._share(point)
        self._prev, self._prev_t = cur, now
        self.points.append(point)
        return point

    def _share(self, point: dict) -> float | None:
        """Positive share of the ratings taken in the last SHARE_WINDOW_S seconds (None: no ratings)."""
        since = point["t"] - SHARE_WINDOW_S
        base = next((p for p in reversed(self.points) if p["t"] <= since), None)
        # no point that old: counters start at 0 with the process, so count everything so far
        base_total, base_positive = (base["_ratings"], base["_positive"]) if base else (0.0, 0.0)
        total = point["_ratings"] - base_total
        return (point["_positive"] - base_positive) / total if total > 0 else None

    def data(self, since: float | None = None, points: list[dict] | None = None) -> dict:
        """Columns: "t" and one list per series (null where a window had nothing to measure), of the
        points newer than `since` (all without it: a page's first request; later ones ask for what is
        new, so a poll costs a point or two, not the whole history). `points`: a copy of self.points
        taken on the event loop, for a caller that serializes elsewhere. `boot` tells a page that the
        server restarted (a new history)."""
        points = list(self.points) if points is None else points
        if since is not None:
            first = len(points)
            while first > 0 and points[first - 1]["t"] > since:
                first -= 1
            points = points[first:]
        keys = [k for k in (points[-1] if points else {}) if not k.startswith("_")]
        return {"interval_s": self.interval_s, "history_s": self.history_s, "boot": self.boot,
                "max_points": self.points.maxlen, "share_window_s": SHARE_WINDOW_S,
                "series": {k: [p.get(k) for p in points] for k in keys}}

    async def run(self) -> None:
        while True:
            try:
                cur = await asyncio.to_thread(snapshot, self.registry)     # collectors off the loop
                self.add(cur, time.time())
            except Exception:                   # never let a sampling failure stop serving
                log.exception("dashboard sample failed")
            await asyncio.sleep(self.interval_s)


def parse_since(raw: str | None) -> float | None:
    """The `since` query parameter: a point's time `t` (seconds since the epoch) or absent."""
    if raw is None:
        return None
    try:
        since = float(raw)
    except ValueError:
        since = math.nan
    if not math.isfinite(since):
        raise InvalidRequestError(f"'since' must be a finite number (a point's t), got {raw!r}.", param="since")
    return since


def install_dashboard(app: FastAPI, state) -> DashboardHistory:
    """Routes of the page and its data; the caller runs history.run() for the app's lifetime."""
    config = state.config
    history = DashboardHistory(state.metrics.registry, config.dashboard_interval_s,
                               config.dashboard_history_s)
    static = files("server") / "static"
    pages = {path: (static.joinpath(name).read_bytes(), media) for path, (name, media) in STATIC.items()}

    async def page(request: Request):
        body, media = pages[request.url.path]
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

    async def data(request: Request):
        since = parse_since(request.query_params.get("since"))
        history = request.app.state.dashboard
        if since is not None:           # a point or two: cheap enough for the event loop
            return JSONResponse(history.data(since), headers={"Cache-Control": "no-store"})
        points = list(history.points)   # the whole history: serialized off the event loop
        body = await asyncio.to_thread(lambda: json.dumps(history.data(points=points), separators=(",", ":")).encode())
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    for path in pages:
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/dashboard/data", data, methods=["GET"], include_in_schema=False)
    app.state.dashboard = history
    return history
