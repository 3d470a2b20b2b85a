"""The OpenAPI schema tells the truth, and the docs are guarded: /docs, /redoc and /openapi.json need a
key when keys are configured (docs_auth) and can be turned off (docs); the schema declares the 400 /
401 / 403 / 404 / 409 / 413 / 429 answers in the OpenAI error shape (no 422) and bearer security.
Then schemathesis, seeded, against the live server (tiny model, training on, API keys): no 5xx, and
every answer's status, content type and body are the ones the schema declares."""
from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup       # a BaseExceptionGroup: the failed checks
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                              status_code_conformance)

from server.app import create_app
from server.testing import ServerThread, tiny_state
from trainer.config import TrainerConfig

USER, ADMIN = "sk-openapi-user", "sk-openapi-admin"
DOCS = ("/docs", "/redoc", "/openapi.json")
POSITIVE, NEGATIVE = 12, 6        # seeded cases per operation and mode: ~290 over the 17 operations


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("openapi")
    training = TrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-3, checkpoint_every=1, min_records_per_step=1)
    state = tiny_state(tiny_model, home / "alchemist.db", run_dir=home / "run", api_keys=[USER],
                       admin_api_keys=[ADMIN], training=training)
    with ServerThread(create_app(state)) as srv:
        yield srv


def _get(url: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url, headers=headers, timeout=30)


def test_docs_need_a_key(server):
    for path in DOCS:
        r = _get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        assert _get(server.url + path, USER).status_code == 200, path


def test_docs_can_be_open_or_off(tiny_model, tmp_path):
    open_state = tiny_state(tiny_model, tmp_path / "a.db", api_keys=[USER], docs_auth=False)
    with ServerThread(create_app(open_state)) as srv:
        assert all(_get(srv.url + path).status_code == 200 for path in DOCS)
        assert _get(srv.url + "/v1/models").status_code == 401           # the API stays guarded
    off_state = tiny_state(tiny_model, tmp_path / "b.db", docs=False)
    with ServerThread(create_app(off_state)) as srv:
        assert all(_get(srv.url + path).status_code == 404 for path in DOCS)


def test_the_schema_declares_errors_and_bearer_auth(server):
    schema = _get(server.url + "/openapi.json", USER).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API key (api_keys / admin_api_keys)"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, item in schema["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)
            assert op.get("security") == ([{"bearer": []}] if path not in ("/health", "/metrics") else None)
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429"} <= set(chat)
    assert chat["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIError"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"403", "409"} <= set(schema["paths"]["/v1/training/pause"]["post"]["responses"])
    assert "201" in schema["paths"]["/feedback"]["post"]["responses"]
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _fuzz(operation, mode, examples: int, auth: dict, failures: list) -> int:
    """`examples` seeded cases of one operation; returns how many ran, appends failures."""
    ran = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case):
        ran.append(case)
        case.call_and_validate(headers=auth, checks=CHECKS, timeout=60)

    try:
        run()
    except Unsatisfiable:                     # negative mode, and nothing to send: /health, /metrics
        assert mode is GenerationMode.NEGATIVE and not ran
    except (Exception, FailureGroup) as exc:   # noqa: BLE001 -- reported together below
        failures.append(f"{operation.label} ({mode.value}): {exc}")
    return len(ran)


def test_schemathesis_finds_no_5xx_and_no_undeclared_answer(server):
    auth = {"Authorization": f"Bearer {ADMIN}"}  # admin keys are accepted everywhere
    live = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=auth)
    operations = [result.ok() for result in live.get_all_operations()]
    failures: list[str] = []
    start, cases = time.monotonic(), 0
    for operation in operations:
        for mode, examples in ((GenerationMode.POSITIVE, POSITIVE), (GenerationMode.NEGATIVE, NEGATIVE)):
            cases += _fuzz(operation, mode, examples, auth, failures)
    seconds = time.monotonic() - start
    print(f"\nschemathesis: {cases} cases over {len(operations)} operations in {seconds:.1f} s")
    assert not failures, "\n\n".join(failures)
    assert len(operations) >= 15 and cases >= 200
