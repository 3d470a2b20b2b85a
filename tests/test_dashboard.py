"""/dashboard's history: quantiles from histogram buckets, rates between snapshots, the bounded ring
buffer, the positive share's sliding window, the keep-up series, the config fields and the /metrics auth
rule for the page and its data (bearer, or HTTP Basic with the key as password)."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.errors import ConfigError
from server.app import create_app
from server.config import ServerConfig
from server.dashboard import SHARE_WINDOW_S, DashboardHistory, histogram_quantile
from server.testing import ServerThread, tiny_state


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)      # rank 10: top of (0.1, 0.2]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.15)    # rank 5: middle of (0.1, 0.2]
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)     # rank 15: middle of (0.2, 0.4]
    assert histogram_quantile(0.99, [(1.0, 0.0), (float("inf"), 4.0)]) == 1.0   # +Inf: the last bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None   # nothing observed


class FakeServer:
    """The registry shapes the dashboard reads, with values the test sets."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self.gen = Counter("alchemist_generation_tokens", "", lbl, registry=r).labels("m")
        self.ttft = Histogram("alchemist_time_to_first_token_seconds", "", lbl, buckets=(0.1, 0.2, 0.4),
                              registry=r).labels("m")
        self.feedback = Counter("alchemist_feedback", "", lbl + ["kind", "value"], registry=r)
        self.running = Gauge("alchemist_num_requests_running", "", lbl, registry=r).labels("m")


def test_points_rates_quantiles_and_ring_bound():
    fake = FakeServer()
    history = DashboardHistory(fake.registry, interval_s=2.0, history_s=10.0)
    first = history.sample(now=100.0)
    assert first["output_tps"] is None and first["ttft_p50"] is None      # one snapshot: no window yet
    fake.gen.inc(50)
    for _ in range(10):
        fake.ttft.observe(0.15)
    fake.running.set(3)
    second = history.sample(now=102.0)
    assert second["output_tps"] == pytest.approx(25.0) and second["running"] == 3.0
    assert 0.1 < second["ttft_p50"] <= 0.2 and 0.1 < second["ttft_p99"] <= 0.2
    third = history.sample(now=104.0)                       # nothing happened in this window
    assert third["output_tps"] == 0.0 and third["ttft_p50"] is None
    for i in range(10):
        history.sample(now=106.0 + 2 * i)
    data = history.data()
    assert len(data["series"]["t"]) == 5 == history.points.maxlen   # 10 s of 2 s points
    assert data["series"]["t"][-1] == 124.0 and "_ratings" not in data["series"]


def test_positive_share_over_a_sliding_window():
    fake = FakeServer()
    history = DashboardHistory(fake.registry, interval_s=60.0, history_s=3600.0)
    assert history.sample(now=0.0)["positive_share"] is None           # no ratings yet
    fake.feedback.labels("m", "thumbs", "-1").inc(3)
    fake.feedback.labels("m", "stars", "5").inc(1)
    point = history.sample(now=60.0)
    assert point["positive_share"] == pytest.approx(0.25) and point["ratings_per_min"] == pytest.approx(4.0)
    fake.feedback.labels("m", "reward", "0.5..1").inc(2)
    later = history.sample(now=60.0 + SHARE_WINDOW_S)                  # the first ratings left the window
    assert later["positive_share"] == pytest.approx(1.0)


@pytest.mark.parametrize("values", [{"dashboard_interval_s": 0}, {"dashboard_history_s": -1},
                                    {"dashboard_interval_s": 5, "dashboard_history_s": 1},
                                    {"dashboard_interval_s": 0.001, "dashboard_history_s": 86400}])
def test_dashboard_config_is_validated(values):
    with pytest.raises(ConfigError):
        ServerConfig.from_dict(values)


def test_page_and_data_follow_the_metrics_auth_rule(tiny_model, tmp_path):
    state = tiny_state(tiny_model, tmp_path / "a.db", api_keys=["k"], metrics_auth=True,
                       dashboard_interval_s=0.2)
    with ServerThread(create_app(state)) as srv:
        for path in ("/dashboard", "/dashboard/data", "/metrics"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 401, path
            challenges = r.headers.get_list("www-authenticate")      # a browser shows its sign-in dialog
            assert "Bearer" in challenges and any(c.startswith("Basic realm=") for c in challenges), challenges
            assert httpx.get(srv.url + path, auth=("alchemist", "wrong")).status_code == 401
        page = httpx.get(srv.url + "/dashboard", auth=("alchemist", "k"))          # the key as password
        assert page.status_code == 200 and 'data-state="loading"' in page.text
        assert httpx.get(srv.url + "/dashboard", headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(srv.url + "/metrics", auth=("k", "")).status_code == 200   # curl -u k:
        bad = httpx.get(srv.url + "/metrics", headers={"Authorization": "Basic %%%"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/dashboard/app.js").headers["content-type"].startswith("text/javascript")
        r = httpx.get(srv.url + "/dashboard/data", auth=("", "k"))
        assert r.status_code == 200 and r.json()["interval_s"] == 0.2
        assert {"t", "output_tps", "mem_weights", "positive_share", "backlog_tokens", "oldest_pending_s",
                "train_tps_window", "training_paused"} <= set(r.json()["series"])
        api = httpx.get(srv.url + "/v1/models", auth=("alchemist", "k"))   # Basic is for the ops paths only
        assert api.status_code == 401 and api.headers.get_list("www-authenticate") == ["Bearer"]
    open_state = tiny_state(tiny_model, tmp_path / "b.db", api_keys=["k"])
    with ServerThread(create_app(open_state)) as srv:
        assert httpx.get(srv.url + "/dashboard/data").status_code == 200
        assert httpx.get(srv.url + "/dashboard").status_code == 200


def test_keep_up_series_come_from_the_gauges():
    registry = CollectorRegistry()
    values = {"alchemist_feedback_backlog_tokens": 1234.0, "alchemist_feedback_oldest_pending_seconds": 42.5,
              "alchemist_train_tokens_per_second": 17.0, "alchemist_training_paused": 1.0}
    for name, v in values.items():
        Gauge(name, "", ["model_name"], registry=registry).labels("m").set(v)
    point = DashboardHistory(registry, interval_s=1.0, history_s=10.0).sample(now=1.0)
    assert (point["backlog_tokens"], point["oldest_pending_s"], point["train_tps_window"],
            point["training_paused"]) == (1234.0, 42.5, 17.0, 1.0)


def test_data_since_a_point_holds_only_newer_points():
    fake = FakeServer()
    history = DashboardHistory(fake.registry, interval_s=1.0, history_s=10.0)
    for now in (1.0, 2.0, 3.0, 4.0):
        history.sample(now=now)
    full = history.data()
    assert full["series"]["t"] == [1.0, 2.0, 3.0, 4.0] and full["max_points"] == 10
    newer = history.data(since=2.0)
    assert newer["series"]["t"] == [3.0, 4.0] and newer["boot"] == full["boot"]
    assert len(newer["series"]["output_tps"]) == 2 and set(newer["series"]) == set(full["series"])
    assert history.data(since=4.0)["series"] == {}                        # nothing new
    assert history.data(since=0.0)["series"]["t"] == full["series"]["t"]


def test_since_is_a_query_parameter(tiny_model, tmp_path):
    state = tiny_state(tiny_model, tmp_path / "a.db", dashboard_interval_s=0.1)
    with ServerThread(create_app(state)) as srv:
        deadline = time.monotonic() + 10
        while len(httpx.get(srv.url + "/dashboard/data").json()["series"].get("t", [])) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        full = httpx.get(srv.url + "/dashboard/data").json()["series"]["t"]
        newer = httpx.get(srv.url + "/dashboard/data", params={"since": full[-2]}).json()["series"]["t"]
        assert newer[0] == full[-1] and all(t > full[-2] for t in newer)
        for bad in ("soon", "nan", "inf"):
            r = httpx.get(srv.url + "/dashboard/data", params={"since": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "since", r.text


def test_non_finite_values_become_null():
    fake = FakeServer()
    fake.running.set(float("nan"))
    history = DashboardHistory(fake.registry, interval_s=1.0, history_s=10.0)
    assert history.sample(now=1.0)["running"] is None
    json.dumps(history.data(), allow_nan=False)
