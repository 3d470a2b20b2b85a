"""The operator's stack in docker/: Prometheus config and alert rules checked by promtool, a real
Prometheus (Debian's `prometheus` package) scraping a live server that served chats, took ratings
and trained, every PromQL expression of the Grafana dashboard and of the alert rules evaluated by it
(status success, and every metric name it references known to that Prometheus: a typo fails), and
`docker compose config` on the compose files where Docker's compose is installed."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from server.app import create_app
from server.testing import ServerThread, free_port, tiny_state
from tests.test_server_training import wait_for
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
PROM_DIR = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "alchemist.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
NO_PROMETHEUS = ("Prometheus is not installed (needs /usr/bin/prometheus and /usr/bin/promtool: "
                 "`apt-get install prometheus`; .ci/run installs it)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
needs_prometheus = pytest.mark.skipif(PROMTOOL is None or PROMETHEUS is None, reason=NO_PROMETHEUS)
PANELS = ("Output and prompt tokens/s", "Time to first token p50 / p99", "Inter-token latency p50 / p99",
          "Running / waiting requests", "KV-cache usage", "Memory by component", "Trained tokens/s by path",
          "Activation reuse outcomes (per minute)", "Ratings per minute",
          "Positive share of ratings (5 min window)", "Feedback backlog", "Adapter version and training loss",
          "Feedback backlog tokens", "Oldest pending rating", "Trained tokens/s (1 min window)",
          "Training paused")
ALERTS = ("AlchemistDown", "AlchemistAbsent", "AlchemistTrainingPaused", "AlchemistTrainingStalled",
          "AlchemistTrainingFailing",
          "AlchemistFeedbackBacklogGrowing", "AlchemistInterTokenLatencyP99High", "AlchemistKVCacheFull",
          "AlchemistNonFiniteTrainingSteps")
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset", "inf", "nan", "atan2"}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in dash["panels"] for t in p["targets"]]


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, grouping labels,
    function names and keywords removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group().lower() in KEYWORDS:
            continue                                      # a function or aggregation, or a keyword
        names.add(m.group())
    return names


def test_metric_names_of_an_expression():
    expr = ('histogram_quantile(0.99, sum by (le, model_name) (rate(alchemist_itl_bucket{job="x", '
            'value=~"a|b"}[5m]))) > 0.2 and on (model_name) increase(alchemist_steps_total[15m]) == 0 '
            'or absent(up{job="alchemist"}) unless alchemst_typo')
    assert metric_names(expr) == {"alchemist_itl_bucket", "alchemist_steps_total", "up", "alchemst_typo"}


def test_dashboard_has_every_panel_on_the_provisioned_data_source():
    dash = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    titles = [p["title"] for p in dash["panels"]]
    assert set(PANELS) <= set(titles), set(PANELS) - set(titles)
    assert len({p["id"] for p in dash["panels"]}) == len(titles)
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == uid and t["expr"].strip() for t in p["targets"]), p["title"]
    memory = next(p for p in dash["panels"] if p["title"] == "Memory by component")
    assert "alchemist_memory_bytes" in memory["targets"][0]["expr"]
    assert {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
            for r in g["rules"]} == set(ALERTS)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def prom_config(directory: Path, target: str, interval: str = "1s") -> Path:
    """A copy of docker/prometheus/ whose scrape target is `target` (host:port)."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    job, = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    shutil.copy(PROM_DIR / "alerts.yml", directory / "alerts.yml")
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    return directory / "prometheus.yml"


@needs_promtool
def test_promtool_checks_config_and_rules(tmp_path):
    for args in (("check", "config", str(PROM_DIR / "prometheus.yml")),
                 ("check", "config", str(prom_config(tmp_path, "127.0.0.1:9")))
                 , ("check", "rules", str(PROM_DIR / "alerts.yml"))):
        r = promtool(*args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    r = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=PROM_DIR, capture_output=True,
                       text=True, timeout=60)        # each alert fires on its condition (see the file)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad.yml"                        # and promtool does fail on a broken rule
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(up[5m]\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


def query(prom: str, expr: str) -> dict:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.status_code, r.text)
    return r.json()["data"]


@pytest.fixture(scope="module")
def prometheus(tiny_model, tmp_path_factory):
    """(Prometheus URL, the metric names it knows) once it has scraped a live server that served
    chats and completions, took ratings and trained on them."""
    if PROMTOOL is None or PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    home = tmp_path_factory.mktemp("ops")
    training = TrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-3, checkpoint_every=1, min_records_per_step=1)
    state = tiny_state(tiny_model, home / "alchemist.db", run_dir=home / "run", training=training)
    with ServerThread(create_app(state)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        for i in range(4):
            r = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"hello number {i}"}], "max_tokens": 6,
                "temperature": 1.0, "stream": i % 2 == 1})
            assert r.status_code == 200, r.text
            rid = (r.json()["id"] if i % 2 == 0 else
                   json.loads(r.text.split("data: ", 2)[1].split("\n", 1)[0])["id"])
            r = http.post("/feedback", json={"id": rid, "choice_index": 0, "rating": 1 if i % 3 else -1})
            assert r.status_code == 201, r.text
        wait_for(lambda: http.get("/v1/training/status").json()["steps"] > 0, 120, "a training step")
        prom_dir = home / "prometheus"
        (prom_dir / "data").mkdir(parents=True)
        config = prom_config(prom_dir, f"127.0.0.1:{srv.port}")
        port = free_port()
        log = prom_dir / "prometheus.log"
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={prom_dir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            def scraped():
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:    # 503 text while the TSDB starts; then three scrapes of an up target
                    if httpx.get(url + "/-/ready", timeout=5).status_code != 200:
                        return False
                    result = query(url, 'count_over_time(up{job="alchemist"}[1m]) >= 3 '
                                        'and up{job="alchemist"} == 1')["result"]
                except httpx.HTTPError:
                    return False
                return result and query(url, "alchemist_train_loss")["result"]
            wait_for(scraped, 60, f"prometheus to scrape the server:\n{log}")
            r = httpx.get(url + "/api/v1/label/__name__/values", timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "success", r.text
            yield url, set(r.json()["data"])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def test_prometheus_knows_the_expected_metrics(prometheus):
    _, known = prometheus
    for name in ("up", "alchemist_generation_tokens_total", "alchemist_inter_token_latency_seconds_bucket",
                 "alchemist_memory_bytes", "alchemist_train_loss", "alchemist_feedback_total",
                 "alchemist_feedback_backlog_tokens", "alchemist_feedback_oldest_pending_seconds",
                 "alchemist_train_tokens_per_second", "alchemist_training_paused"):
        assert name in known, name
    assert "alchemist_generation_token_total" not in known          # the name check can fail


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_expression_evaluates_on_real_prometheus(prometheus, source):
    url, known = prometheus
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    empty, unknown = [], []
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, (where, expr)
        unknown += [(where, n) for n in sorted(names - known)]
        if not query(url, expr)["result"]:
            empty.append(where)
    assert not unknown, f"metric names Prometheus does not know: {unknown}"
    if source == "dashboard":        # the server served, was rated and trained: every panel has data
        assert not empty, f"panels with no data: {empty}"


def test_alert_rules_load_and_evaluate_healthy(prometheus):
    url, _ = prometheus

    def rules():
        groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        found = [r for g in groups for r in g["rules"]]
        return found if found and all(r.get("lastEvaluation", "").startswith("20") for r in found) else None
    found = wait_for(rules, 30, "the alert rules to be evaluated")
    assert {r["name"] for r in found} == set(ALERTS)
    assert all(r["health"] == "ok" for r in found), [(r["name"], r.get("lastError")) for r in found]
    firing = {r["name"] for r in found if r["state"] == "firing"}
    assert not {"AlchemistDown", "AlchemistAbsent", "AlchemistKVCacheFull"} & firing, firing


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.cuda.yaml"]])
def test_docker_compose_config(files):
    cmd = compose_command()
    if cmd is None:
        pytest.skip("Docker Compose is not installed (`docker compose` or `docker-compose`)")
    args = [a for f in files for a in ("-f", str(DOCKER / f))]
    r = subprocess.run(cmd + args + ["config"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    assert set(services) == {"alchemist", "prometheus", "grafana"}
    dockerfile = "docker/Dockerfile.cuda" if "compose.cuda.yaml" in files else "docker/Dockerfile"
    assert services["alchemist"]["build"]["dockerfile"] == dockerfile
    for mount in ("prometheus", "grafana"):
        for volume in services[mount]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), (mount, source)      # the provisioned files are there
