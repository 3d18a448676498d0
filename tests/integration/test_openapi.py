"""The OpenAPI description against the real running ingress, with Schemathesis.

The ingress listens on a real socket (IngressRunner/TCPSite, as `serve` runs it)
and publishes to the session's real broker. Schemathesis is synchronous (requests), so it
runs in a worker thread while this test's event loop serves it. Authentication is on (a
shared token) so the `ignored_auth` check can show that leaving it out gets 401.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_PATH
from ingress import openapi
from ingress.app import create_app
from ingress.auth import TOKEN_HEADER
from ingress.server import IngressRunner
from ingress.settings import IngressSettings
from tests.support.threadedhypothesis import RANDOM_USED_BY_ANOTHER_THREAD

pytestmark = RANDOM_USED_BY_ANOTHER_THREAD

TOKEN = "openapi-test-token-7d1e"
# Per operation and generation mode; the webhook's two runs dominate, well under a minute.
WEBHOOK_EXAMPLES = 100
OTHER_EXAMPLES = 5
AUTH_HEADERS = (SIGNATURE_HEADER, TIMESTAMP_HEADER, TOKEN_HEADER)


def _checks() -> list[Any]:
    checks = schemathesis.checks
    return [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
        checks.response_headers_conformance,
        checks.ignored_auth,
    ]


@pytest.fixture
def live_settings(kafka: KafkaSettings, tmp_path: Path) -> IngressSettings:
    return IngressSettings(
        kafka=kafka,
        host="127.0.0.1",
        port=0,
        shared_tokens=(Secret(TOKEN),),
        spool_dir=tmp_path / "spool",
    )


@pytest.fixture
async def live_ingress(live_settings: IngressSettings) -> AsyncIterator[str]:
    """The base URL of a real ingress on a real socket, once it is ready."""
    runner = IngressRunner(create_app(live_settings))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await _until_ready(base_url)
        yield base_url
    finally:
        await runner.cleanup()


async def _until_ready(base_url: str, timeout: float = 60.0) -> None:
    # A 503 before the producer connects would (rightly) count as a server error.
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{base_url}/readyz") as resp:
                if resp.status == 200:
                    return
            assert asyncio.get_running_loop().time() < deadline, "ingress never became ready"
            await asyncio.sleep(0.2)


def _fuzz(base_url: str) -> dict[str, Counter[int]]:
    """Every operation, positive and negative cases; raises on the first failed check.
    Returns the status codes seen, per operation and mode."""
    schema = schemathesis.openapi.from_url(f"{base_url}{openapi.PATH}")
    seen: dict[str, Counter[int]] = {}
    with requests.Session() as http:
        for result in schema.get_all_operations():
            # A part of the description Schemathesis cannot read is a failure of its own.
            assert isinstance(result, Ok), result
            operation = result.ok()
            is_webhook = operation.path == WEBHOOK_PATH
            modes = list(GenerationMode) if is_webhook else [GenerationMode.POSITIVE]
            for mode in modes:
                examples = WEBHOOK_EXAMPLES if is_webhook else OTHER_EXAMPLES
                seen[f"{operation.label} {mode.value}"] = _fuzz_one(
                    operation, mode, examples, base_url, http
                )
    return seen


def _fuzz_one(
    operation: schemathesis.APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    examples: int,
    base_url: str,
    http: requests.Session,
) -> Counter[int]:
    checks = _checks()
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # A GET without parameters has a single case; that is not a problem here.
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case[Any]) -> None:
        # Schemathesis fills the declared security headers with junk; only our token may
        # authenticate, so that `ignored_auth` can tell what leaving it out does.
        for name in AUTH_HEADERS:
            case.headers.pop(name, None)
        response = case.call_and_validate(
            base_url=base_url,
            session=http,
            headers={TOKEN_HEADER: TOKEN},
            checks=checks,
            timeout=30,
        )
        statuses[response.status_code] += 1

    run()
    return statuses


async def test_openapi_json_is_the_description_of_this_ingress(
    live_ingress: str, live_settings: IngressSettings
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{live_ingress}{openapi.PATH}") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/json"
        served = await resp.json()
    assert served == openapi.document(live_settings)
    assert WEBHOOK_PATH in served["paths"]
    assert served["openapi"] == "3.1.0"
    webhook = served["paths"][WEBHOOK_PATH]["post"]
    body_schema = webhook["requestBody"]["content"]["application/json"]["schema"]
    payload = served["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[1]]
    assert [ref["$ref"].rsplit("/", 1)[1] for ref in payload["oneOf"]] == [
        "FlatPayload",
        "NestedCamelPayload",
        "NestedSnakePayload",
    ]
    assert set(webhook["responses"]) == {
        "200",
        "202",
        "400",
        "401",
        "408",
        "413",
        "415",
        "422",
        "429",
        "500",
        "503",
    }
    assert set(served["paths"]) == {
        WEBHOOK_PATH,
        "/healthz",
        "/readyz",
        "/metrics",
        openapi.PATH,
    }


def test_the_examples_in_the_description_are_valid_payloads() -> None:
    """Each example validates against exactly the shape it illustrates, and only that one."""
    import jsonschema_rs

    settings_ = IngressSettings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"))
    doc = openapi.document(settings_)
    components = doc["components"]["schemas"]

    def validator(name: str) -> Any:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        return jsonschema_rs.Draft202012Validator(schema)

    examples = doc["paths"][WEBHOOK_PATH]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]
    expected = {
        "flat": "FlatPayload",
        "nestedCamel": "NestedCamelPayload",
        "nestedSnake": "NestedSnakePayload",
        "statusUpdate": "FlatPayload",
    }
    shapes = ["FlatPayload", "NestedCamelPayload", "NestedSnakePayload"]
    for name, example in examples.items():
        matching = [shape for shape in shapes if validator(shape).is_valid(example["value"])]
        assert matching == [expected[name]], name
        assert validator("Payload").is_valid(example["value"]), name
    assert set(components) >= set(shapes)


async def test_schemathesis_finds_no_server_error_and_every_response_conforms(
    live_ingress: str,
) -> None:
    seen = await asyncio.to_thread(_fuzz, live_ingress)
    # The generated reports reach both sides of the contract: accepted and refused.
    positive = seen[f"POST {WEBHOOK_PATH} positive"]
    assert positive[202] > 0, positive
    assert sum(n for status, n in positive.items() if 400 <= status < 500) > 0, positive
    negative = seen[f"POST {WEBHOOK_PATH} negative"]
    assert sum(negative.values()) >= WEBHOOK_EXAMPLES // 2, negative
    for path in ("/healthz", "/readyz", "/metrics"):
        assert seen[f"GET {path} positive"][200] >= 1
