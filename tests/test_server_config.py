"""Configuration layers, the CLI (`alchemist serve` / `alchemist generate`), API-key identities,
validation-error mapping, and metrics_auth."""
from __future__ import annotations

import json

import httpx
import pytest

from engine.config import EngineConfig
from common.errors import AuthenticationError, ConfigError
from server.app import create_app, validation_message
from server.auth import ApiKeys, key_identity
from server.cli import _config, _parser, main
from server.config import ServerConfig, build_config
from server.testing import ServerThread, tiny_state


def test_config_file_layers_and_env_keys(tmp_path, monkeypatch):
    path = tmp_path / "alchemist.json"
    path.write_text(json.dumps({
        "host": "0.0.0.0", "port": 9000, "api_keys": ["file-key"], "served_model_name": "smol",
        "db_path": str(tmp_path / "x.db"), "retention_days": 2, "max_waiting": 7,
        "max_prompt_tokens": 100, "metrics_auth": True,
        "engine": {"device": "cpu", "block_size": 32, "max_num_seqs": 8}}))
    monkeypatch.setenv("ALCHEMIST_API_KEYS", "env-a, env-b,,")
    cfg = build_config(str(path), port=9100, api_keys=["flag-key", "env-a"], model="/m")
    assert (cfg.host, cfg.port, cfg.served_model_name, cfg.max_waiting) == ("0.0.0.0", 9100, "smol", 7)
    assert cfg.api_keys == ["file-key", "env-a", "env-b", "flag-key"]
    assert cfg.retention_seconds == 2 * 86400 and cfg.metrics_auth and cfg.max_prompt_tokens == 100
    assert isinstance(cfg.engine, EngineConfig) and cfg.engine.block_size == 32 and cfg.engine.model == "/m"
    assert cfg.resolved_db_path() == tmp_path / "x.db"
    monkeypatch.delenv("ALCHEMIST_API_KEYS")
    default = build_config()
    assert (default.host, default.port, default.api_keys) == ("127.0.0.1", 8000, [])
    monkeypatch.setenv("ALCHEMIST_HOME", str(tmp_path / "home"))
    assert default.resolved_db_path() == tmp_path / "home" / "alchemist.db"


@pytest.mark.parametrize("content, words", [
    ('{"prot": 1}', "unknown server option"),
    ('{"engine": {"blocksize": 16}}', "unknown engine option"),
    ('{"port": 8000,', "not valid JSON"),
    ("[1]", "JSON object"),
    ('{"retention_days": 0}', "retention_days"),
    ('{"engine": {"block_size": 3}}', "block_size"),
    ('{"training": {"duty_cycle": 0}}', "duty_cycle"),
    ('{"training": {"tbt_slo_ratio": 0.9}}', "tbt_slo_ratio"),
    ('{"training": {"token_buckets": [512, 1024]}}', "token_buckets"),
    ('{"engine": {"capture_stream": "fast"}}', "capture_stream"),
    ('{"engine": {"max_waiting": 8}}', "server options now: put them at the top level"),
    ('{"max_waiting": 0}', "max_waiting"),
])
def test_config_errors_say_what_to_change(tmp_path, content, words):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=words):
        ServerConfig.load(path)


def test_cli_serve_flags(monkeypatch):
    monkeypatch.delenv("ALCHEMIST_API_KEYS", raising=False)
    args = _parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "1234", "--api-key", "a",
                                 "--api-key", "b", "--model", "/models/x", "--db-path", "/tmp/f.db"])
    cfg = _config(args)
    assert (cfg.host, cfg.port, cfg.api_keys, cfg.engine.model, cfg.db_path) == (
        "0.0.0.0", 1234, ["a", "b"], "/models/x", "/tmp/f.db")
    gen = _parser().parse_args(["generate", "hello", "--max-tokens", "5", "--temperature", "0.5"])
    assert (gen.prompt, gen.max_tokens, gen.temperature) == ("hello", 5, 0.5)


def test_api_keys_and_identities():
    keys = ApiKeys(["alpha", "beta"])
    assert keys.identify("Bearer beta") == key_identity("beta") != key_identity("alpha")
    assert "beta" not in key_identity("beta") and key_identity("beta").startswith("sha256:")
    for header in (None, "", "Bearer", "Bearer gamma", "Basic alpha", "alpha"):
        with pytest.raises(AuthenticationError):
            keys.identify(header)
    assert ApiKeys([]).identify(None) is None


def test_validation_errors_become_param_and_message():
    assert validation_message([{"type": "json_invalid", "loc": ("body", 3), "msg": "x",
                                "ctx": {"error": "Expecting value"}}])[1] is None
    msg, param = validation_message([{"type": "literal_error", "loc": ("body", "messages", 0, "role"),
                                      "msg": "Input should be 'user'"}])
    assert param == "messages.0.role" and "Input should be" in msg
    assert validation_message([{"type": "int_type", "loc": ("body", "stop", "list[str]", 0), "msg": "m"}])[1] \
        == "stop.0"
    assert validation_message([{"type": "missing", "loc": ("body",), "msg": "Field required"}])[1] is None
    assert validation_message([{"type": "int_parsing", "loc": ("query", "limit"), "msg": "m"}])[1] == "limit"


def test_metrics_auth_guards_metrics_and_health(tiny_model, tmp_path):
    state = tiny_state(tiny_model, tmp_path / "a.db", api_keys=["k"], metrics_auth=True,
                       served_model_name="tiny")
    with ServerThread(create_app(state)) as srv, httpx.Client(base_url=srv.url) as http:
        for path in ("/metrics", "/health"):
            assert http.get(path).status_code == 401
            assert http.get(path, headers={"Authorization": "Bearer k"}).status_code == 200
        models = http.get("/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]


def test_cli_generate_offline(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALCHEMIST_HOME", str(tmp_path))
    config = tmp_path / "small-kv.json"
    config.write_text('{"engine": {"kv_cache_bytes": 8388608}}')
    assert main(["generate", "Hello there", "--max-tokens", "4", "--model", str(tiny_model),
                 "--device", "cpu", "--config", str(config)]) == 0
    assert capsys.readouterr().out.endswith("\n")          # random weights: may be blank
    assert main(["generate", "Hello there", "--max-tokens", "4", "--model", str(tiny_model), "--raw",
                 "--seed", "3", "--temperature", "1", "--config", str(config)]) == 0
    first = capsys.readouterr().out
    assert first.strip()
    main(["generate", "Hello there", "--max-tokens", "4", "--model", str(tiny_model), "--raw",
          "--seed", "3", "--temperature", "1", "--config", str(config)])
    assert capsys.readouterr().out == first                 # seeded: reproducible


def test_cli_config_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"engine": {"nope": 1}}')
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown engine option" in err and "Traceback" not in err


def test_duty_cycle_default_depends_on_where_steps_run():
    from trainer.config import TrainerConfig
    from trainer.pacing import StepPacing
    assert StepPacing(TrainerConfig(), threaded=True).duty_cycle == 1.0       # GPU: the latency budget paces
    assert StepPacing(TrainerConfig(tbt_slo_ratio=None), threaded=True).duty_cycle == 0.25   # no budget
    assert StepPacing(TrainerConfig(), threaded=False).duty_cycle == 0.5      # CPU: between engine steps
    assert StepPacing(TrainerConfig(duty_cycle=0.8), threaded=True).duty_cycle == 0.8
