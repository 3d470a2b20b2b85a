"""What `alchemist simulate` reports (trainer/simulate.py): the trainer's numbers from a /metrics
scrape, the rolling positive rate, and the picture (curve.png: positive rate vs feedback count; train
tok/s and the reuse hit rate over time)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path


def parse_metrics(text: str) -> dict:
    """The trainer's numbers from Prometheus text; keys only for the metrics present."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "alchemist_train_tokens_total":
                out.setdefault("tokens", Counter())[s.labels.get("path", "")] += s.value
            elif s.name == "alchemist_activation_reuse_total":
                out.setdefault("reuse", Counter())[s.labels.get("outcome", "")] += s.value
            elif s.name in ("alchemist_train_steps_total", "alchemist_adapter_version",
                            "alchemist_train_loss", "alchemist_feedback_pending"):
                key = s.name.removeprefix("alchemist_").removesuffix("_total")
                out[key] = out.get(key, 0) + s.value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in out.items()}


def train_tokens(m: dict) -> float | None:
    return sum(m["tokens"].values()) if "tokens" in m else None


def reuse_hit_rate(m: dict) -> float | None:
    """Share of trained records whose activations came from the pool (hit or stale-within-bound)."""
    outcomes = m.get("reuse") or {}
    total = sum(outcomes.values())
    if total:
        return (outcomes.get("hit", 0) + outcomes.get("stale", 0)) / total
    tokens = m.get("tokens") or {}
    return tokens.get("reuse", 0) / sum(tokens.values()) if sum(tokens.values()) else None


def rolling(ratings: list[int], window: int) -> list[float]:
    """Positive rate over the last `window` ratings, at each rating."""
    out, positives = [], 0
    for i, r in enumerate(ratings):
        positives += r > 0
        if i >= window:
            positives -= ratings[i - window] > 0
        out.append(positives / min(i + 1, window))
    return out


def positive_rate(ratings: list[int]) -> float | None:
    return sum(r > 0 for r in ratings) / len(ratings) if ratings else None


def train_series(scrapes: list[dict], min_dt: float = 1.0) -> tuple[list, list, list]:
    """(elapsed s, train tok/s since the previous point >= min_dt earlier, cumulative reuse hit rate)."""
    times, speeds, hits = [], [], []
    anchor = next((s for s in scrapes if train_tokens(s) is not None), None)
    for cur in scrapes:
        if anchor is None or train_tokens(cur) is None or cur["t"] - anchor["t"] < min_dt:
            continue
        times.append(cur["t"])
        speeds.append((train_tokens(cur) - train_tokens(anchor)) / (cur["t"] - anchor["t"]))
        hit = reuse_hit_rate(cur)
        hits.append(float("nan") if hit is None else hit)
        anchor = cur
    return times, speeds, hits


def plot(path: Path, ratings: list[int], window: int, scrapes: list[dict], rater: str,
         min_dt: float = 1.0) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 7))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    top.plot(range(1, len(ratings) + 1), rolling(ratings, window), color="tab:blue")
    top.set(ylim=(-0.02, 1.02), xlabel="feedback count", ylabel=f"positive rate (last {window})",
            title=f"simulated users, rater '{rater}'")
    top.grid(alpha=0.3)
    times, speeds, hits = train_series(scrapes, min_dt)
    if times:
        speed_line, = bottom.plot(times, speeds, color="tab:green", label="train tok/s")
        bottom.set(xlabel="elapsed s", ylabel="train tok/s")
        twin = bottom.twinx()
        hit_line, = twin.plot(times, hits, color="tab:orange", label="reuse hit rate")
        twin.set(ylim=(-0.02, 1.02), ylabel="reuse hit rate (cumulative)")
        bottom.legend(handles=[speed_line, hit_line], loc="upper right")
    else:
        bottom.text(0.5, 0.5, "no training metrics exposed by the server", ha="center", va="center")
        bottom.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
