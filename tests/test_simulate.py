"""`alchemist simulate`: the raters (pure, deterministic, threshold edges), the built-in prompts, the
metrics parsing, and a short end-to-end run against a real uvicorn server with the tiny random model."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from engine.embedded_model import ensure_default_model
from server.app import create_app
from server.cli import main as cli_main
from server.testing import ServerThread, make_tiny_model, tiny_state
from trainer.prompts import CATEGORIES, PROMPTS, prompt_order
from trainer.simulate import CONCISE_MAX_WORDS, RATERS, rate, rate_complete
from trainer.simulate_report import parse_metrics, reuse_hit_rate, rolling

KEY = "sk-simulate-test"


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_concise_threshold_edges():
    assert CONCISE_MAX_WORDS == 30
    assert rate("") == 1
    assert rate(words(CONCISE_MAX_WORDS)) == 1
    assert rate(words(CONCISE_MAX_WORDS + 1)) == -1
    assert rate("  a\n\nb\tc  ") == 1                         # whitespace split, not characters
    assert rate("\n".join(words(40).split())) == -1
    assert [rate(words(n)) for n in (29, 30, 31)] == [1, 1, -1]


def test_complete_rater():
    assert rate_complete("Paris is the capital.") == 1
    assert rate_complete("Really?  \n") == 1
    assert rate_complete('He said "stop."') == 1
    assert rate_complete("(see above.)") == 1
    assert rate_complete("```python\nprint(1)\n```") == 1
    assert rate_complete("The answer is that the") == -1
    assert rate_complete("") == -1
    assert rate_complete("1. First, 2.5") == -1


def test_raters_are_pure_and_selectable():
    assert set(RATERS) >= {"concise", "complete"} and RATERS["concise"] is rate
    text = words(12) + "."
    for fn in RATERS.values():
        assert fn(text) == fn(text) and fn(text) in (-1, 1)


def test_prompts_and_order():
    assert 70 <= len(PROMPTS) <= 100 and len(CATEGORIES) == 8
    assert len({t for _, t in PROMPTS}) == len(PROMPTS)
    assert all(0 < len(t) < 200 for _, t in PROMPTS)
    order = prompt_order(3, 2 * len(PROMPTS) + 5)
    assert sorted(order[:len(PROMPTS)]) == list(range(len(PROMPTS)))     # each pass covers all
    assert order == prompt_order(3, len(order)) and order != prompt_order(4, len(order))


def test_rolling_and_metrics_parsing():
    assert rolling([1, -1, 1, 1], 2) == [1.0, 0.5, 0.5, 1.0]
    text = ('alchemist_train_tokens_total{model_name="m",path="reuse"} 30\n'
            'alchemist_train_tokens_total{model_name="m",path="recompute"} 10\n'
            'alchemist_train_steps_total{model_name="m"} 4\n'
            'alchemist_adapter_version{model_name="m"} 4\n'
            'alchemist_activation_reuse_total{model_name="m",outcome="hit"} 2\n'
            'alchemist_activation_reuse_total{model_name="m",outcome="stale"} 1\n'
            'alchemist_activation_reuse_total{model_name="m",outcome="evicted"} 1\n')
    m = parse_metrics(text)
    assert m["tokens"] == {"reuse": 30, "recompute": 10} and m["train_steps"] == 4
    assert m["adapter_version"] == 4 and reuse_hit_rate(m) == 0.75
    assert parse_metrics("process_cpu_seconds_total 1.0\n") == {} and reuse_hit_rate({}) is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.getbasetemp() / "tiny-llama", ensure_default_model())
    state = tiny_state(model, tmp_path_factory.mktemp("simulate") / "alchemist.db", api_keys=[KEY])
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv


def test_simulate_end_to_end(server, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["simulate", "--base-url", server.url + "/v1", "--api-key", KEY, "--events", "12",
                   "--out", str(out), "--concurrency", "3", "--max-tokens", "8", "--window", "5",
                   "--log-every", "5", "--scrape-every", "0.2"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum("events " in line for line in lines[:-1]) == 2                 # at 5 and 10 events
    summary = json.loads(lines[-1])
    assert {"initial_rate", "final_rate", "events", "errors", "elapsed_s", "reuse_hit_rate",
            "train_tokens"} <= set(summary)
    assert summary["events"] == 12 and summary["errors"] == 0 and summary["feedback_accepted"] == 12
    assert json.loads((out / "summary.json").read_text()) == summary
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sorted(e["index"] for e in events) == list(range(12))
    assert all(e["rating"] == rate(e["response"]) and e["feedback_status"] == 201 for e in events)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for e in events:
            got = http.get(f"/feedback/{e['feedback_id']}")
            assert got.status_code == 200 and got.json()["id"] == e["id"]
            assert got.json()["rating"] == e["rating"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ratings = [e["rating"] for e in sorted(events, key=lambda e: e["index"])]
    assert summary["initial_rate"] == sum(r > 0 for r in ratings[:5]) / 5
    assert summary["final_rate"] == sum(r > 0 for r in ratings[-5:]) / 5


def test_simulate_counts_errors_without_crashing(tmp_path, capsys):
    from server.testing import free_port
    rc = cli_main(["simulate", "--base-url", f"http://127.0.0.1:{free_port()}", "--events", "3",
                   "--out", str(tmp_path), "--model", "m", "--retries", "1", "--concurrency", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and summary["events"] == 3 and summary["errors"] == 3 and summary["initial_rate"] is None
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 3
    assert (Path(tmp_path) / "curve.png").read_bytes()[:4] == b"\x89PNG"
