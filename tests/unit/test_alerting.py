"""The `alerting` consumer against real receivers: an aiosmtpd SMTP server and aiohttp
webhook servers started by the tests (signature-checking, rate-limiting, failing, hanging
and redirecting ones).

Reports are built the way the runner sees them: the real sample through the normaliser,
an Avro round trip on the current schema, then `CallReport.from_record`.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import ipaddress
import itertools
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from aiosmtpd.controller import Controller
from prometheus_client import CollectorRegistry

from callstream.ports import free_port
from consumers.alerting import (
    AlertingConsumer,
    AlertKey,
    AlertState,
    ConditionError,
    NetworkPolicy,
    ReportView,
    RuleFileError,
    build,
    load_rule_file,
    parse_condition,
    parse_retry_after,
    privacy_safe,
)
from consumers.contract import Delivery
from consumers.errors import RetryableError
from schemas.codec import Decoder, single_object_encoder
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store
from tests.support.alerting import email_channel as email
from tests.support.paths import REPO

SAMPLE_PATH = REPO.parent / "shared" / "samples" / "end-of-call-report.json"
EXAMPLE_RULES = REPO / "examples" / "alert-rules.yaml"
SAMPLE: dict[str, Any] = orjson.loads(SAMPLE_PATH.read_bytes())
SAMPLE_CALLER = "+31623731537"
WEBHOOK_SECRET = "test-webhook-secret"
ENCODER = single_object_encoder(default_store().current(END_OF_CALL_REPORT))
DECODER = Decoder(default_store())
_OFFSETS = itertools.count()


# -- reports ------------------------------------------------------------------------------


def payload(
    call_id: str | None = None, *, structured: Mapping[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """The sample with a fresh call id, top-level changes and structuredData changes."""
    out = copy.deepcopy(SAMPLE)
    out["callId"] = call_id or str(uuid.uuid4())
    out.update(top)
    out["analysis"]["structuredData"].update(structured or {})
    return out


def delivery(raw: dict[str, Any]) -> Delivery:
    normalised = normalise(raw, received_at_ms=int(time.time() * 1000), request_id="req-1")
    assert normalised.record is not None
    value = ENCODER.encode(normalised.record)
    report = CallReport.from_record(DECODER.decode_local(value).record)
    return Delivery(report, "flireo.end-of-call-report", 0, next(_OFFSETS), value)


def matches(condition: str, raw: dict[str, Any]) -> bool:
    return parse_condition(condition).evaluate(ReportView(delivery(raw).report))


# -- receivers ----------------------------------------------------------------------------


@dataclass
class Hit:
    at: float
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """An aiohttp app with one route per behaviour; every request is recorded by path."""

    host: str = "127.0.0.1"
    hits: dict[str, list[Hit]] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def of(self, path: str) -> list[Hit]:
        return self.hits.get(path, [])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release.set()  # lets /hang return so cleanup does not wait on it
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        self.hits.setdefault(path, []).append(Hit(time.monotonic(), dict(request.headers), body))
        count = len(self.hits[path])
        if path == "/hook":
            timestamp = request.headers.get("X-Callstream-Timestamp", "")
            expected = hmac.new(
                WEBHOOK_SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256
            ).hexdigest()
            given = request.headers.get("X-Callstream-Signature", "")
            fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
            if not (fresh and hmac.compare_digest(given, f"sha256={expected}")):
                return web.Response(status=401, text="bad signature")
        if path == "/limited" and count == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        if path == "/broken":
            return web.Response(status=500)
        if path == "/gone":
            return web.Response(status=410)
        if path == "/hang":
            await self.release.wait()
        if path == "/redirect":
            return web.Response(status=307, headers={"Location": request.query["to"]})
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[float, EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((time.monotonic(), message))
        return "250 OK"


@dataclass
class Smtp:
    port: int
    mailbox: Mailbox


@pytest.fixture
def smtp() -> Iterator[Smtp]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield Smtp(port, mailbox)
    finally:
        controller.stop()


# -- the consumer -------------------------------------------------------------------------


def base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "CALLSTREAM_ALERT_STATE_PATH": str(tmp_path / "state" / "alerting.db"),
        "CALLSTREAM_ALERT_ALLOWED_NETWORKS": "127.0.0.1/32",
        "CALLSTREAM_ALERT_TIMEOUT_SECONDS": "2",
        "CALLSTREAM_ALERT_MAX_ATTEMPTS": "3",
        "CALLSTREAM_ALERT_BACKOFF_SECONDS": "0.02",
        "CALLSTREAM_ALERT_BACKOFF_MAX_SECONDS": "0.1",
        "CALLSTREAM_ALERT_RETRY_BUDGET_SECONDS": "10",
        "CALLSTREAM_ALERT_STATE_BUSY_TIMEOUT_SECONDS": "0.05",
        "TEST_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


def slack(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "slack", "url": url, **extra}


def webhook(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": url, "secret_env": "TEST_WEBHOOK_SECRET", **extra}


def rule_file(tmp_path: Path, channels: Mapping[str, Any], when: Any = "sentiment > 5") -> Path:
    """One rule (`alarm`, matching the sample by default) notifying every channel."""
    path = tmp_path / "rules.yaml"
    spec = {
        "channels": dict(channels),
        "rules": [{"name": "alarm", "when": when, "channels": list(channels)}],
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@asynccontextmanager
async def running(
    tmp_path: Path,
    channels: Mapping[str, Any] | None = None,
    *,
    when: Any = "sentiment > 5",
    registry: CollectorRegistry | None = None,
    **env_overrides: str,
) -> AsyncIterator[tuple[AlertingConsumer, CollectorRegistry]]:
    env = base_env(tmp_path)
    if channels is not None:
        env["CALLSTREAM_ALERT_RULES"] = str(rule_file(tmp_path, channels, when))
    env.update(env_overrides)
    registry = registry or CollectorRegistry()
    consumer = build(env, registry)
    await consumer.start()
    try:
        yield consumer, registry
    finally:
        await consumer.stop()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def dead_letters(tmp_path: Path) -> list[tuple[str, str, str, str, int]]:
    with closing(sqlite3.connect(tmp_path / "state" / "alerting.db")) as conn:
        rows = conn.execute(
            "SELECT rule, channel, channel_type, reason, attempts FROM alert_dead_letters"
        ).fetchall()
    return [tuple(row) for row in rows]


# -- the condition language ---------------------------------------------------------------


def test_and_binds_tighter_than_or_and_not_tighter_than_and() -> None:
    raw = payload(structured={"a": True, "b": False, "c": False})
    # a or (b and c) -> true; (a or b) and c -> false
    assert matches("a or b and c", raw)
    assert not matches("(a or b) and c", raw)
    # not applies to the comparison, not to the field: not (c == true)
    assert matches("not c == true and a", raw)
    assert matches("not (a and c)", raw)
    assert not matches("not a or c", raw)


def test_comparisons_on_the_sample() -> None:
    raw = payload()
    assert matches("sentiment > 5 and sentiment <= 9", raw)
    assert matches("technische_problemen == false", raw)
    assert matches('successEvaluation == "true"', raw)
    assert matches("vervolgactie_nodig", raw)
    assert matches("gesprek_kwaliteit == 'Uitstekend'", raw)
    assert matches("report.duration_seconds >= 132.5 and duration_seconds < 1e3", raw)
    assert matches("user_metadata.preferredRole == 'backend'", raw)
    assert matches("from_number != null and report.call_type == null", raw)
    assert not matches("sentiment < 5", raw)


def test_a_type_mismatch_is_false_for_every_operator() -> None:
    raw = payload(structured={"sentiment": "high"})
    for op in ("==", "!=", "<", "<=", ">", ">="):
        assert not matches(f"sentiment {op} 5", raw), op
    assert matches("not sentiment == 5", raw)
    # successEvaluation is the string "true": a boolean never equals it
    assert not matches("successEvaluation == true", raw)
    assert not matches("successEvaluation != true", raw)
    # ordering on booleans is false, not an error
    assert not matches("vervolgactie_nodig > technische_problemen", raw)


def test_missing_fields_are_null_and_only_presence_tests_match_them() -> None:
    raw = payload()
    assert matches("nieuw_veld_99 == null", raw)
    assert not matches("nieuw_veld_99 != null", raw)
    assert not matches("nieuw_veld_99 < 5", raw)
    assert not matches("nieuw_veld_99 != 5", raw)
    assert not matches("nieuw_veld_99", raw)
    assert not matches("structured.sentiment.deeper == 1", raw)


def test_a_bare_name_prefers_structured_data_and_prefixes_pin_the_source() -> None:
    raw = payload(structured={"duration_seconds": 5})  # the call itself lasted 132.5 s
    assert matches("duration_seconds < 20", raw)
    assert not matches("report.duration_seconds < 20", raw)
    assert matches("structured.duration_seconds == 5", raw)
    assert not matches("durationSeconds < 20", raw)  # camelCase is only a report alias


def test_truthiness_follows_json_emptiness() -> None:
    raw = payload(structured={"zero": 0, "empty": "", "word": "false", "none": None})
    assert not matches("zero or empty or none", raw)
    assert matches("word", raw)  # a non-empty string, whatever it says


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sentiment = 5", "use =="),
        ("a && b", "use `and`"),
        ("1 < sentiment < 5", "cannot be chained"),
        ("(sentiment < 5", "expected ')'"),
        ("sentiment <", "ends where a value was expected"),
        ("sentiment < 5 5", "unexpected '5'"),
        ("True", "write 'true'"),
        ("report.nope == 1", "no field 'nope'"),
        ("'open", "not closed"),
        ("flag < true", "needs numbers or strings"),
        ("5 == 'five'", "always false"),
        ("", "empty"),
        ("(" * 40 + "a" + ")" * 40, "nested deeper"),
    ],
)
def test_bad_conditions_are_rejected_with_a_position(text: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_condition(text)
    assert message in caught.value.message
    assert 0 <= caught.value.offset <= len(text)


def test_the_example_rule_file_loads_and_judges_the_sample() -> None:
    env = {
        "CALLSTREAM_ALERT_SLACK_URL": "https://hooks.slack.com/services/T0/B0/x",
        "CALLSTREAM_ALERT_CRM_SECRET": "s",
        "CALLSTREAM_ALERT_SMTP_PASSWORD": "p",
    }
    rules = load_rule_file(EXAMPLE_RULES, env)
    assert set(rules.channels) == {"team-slack", "crm-webhook", "support-mail"}
    assert {channel.type for channel in rules.channels.values()} == {"slack", "webhook", "email"}
    assert [r.name for r in rules.rules] == [
        "unhappy-caller",
        "technical-problems",
        "call-failed",
        "follow-up-needed",
        "hung-up-early",
    ]  # the disabled rule is not loaded
    sample = delivery(payload()).report
    assert [r.name for r in rules.matching(sample)] == ["follow-up-needed"]
    unhappy = delivery(
        payload(structured={"sentiment": 2, "technische_problemen": True}, callLengthSeconds=12)
    ).report
    assert [r.name for r in rules.matching(unhappy)] == [
        "unhappy-caller",
        "technical-problems",
        "follow-up-needed",
        "hung-up-early",
    ]


def test_a_bad_rule_file_names_every_problem_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "channels:\n"  # 1
        "  hook:\n"  # 2
        "    type: webhook\n"  # 3
        "    url: https://example.com/x\n"  # 4
        "    secret: hunter2\n"  # 5
        "  mail:\n"  # 6
        "    type: email\n"  # 7
        "    host: smtp.example.com\n"  # 8
        "    from: not-an-address\n"  # 9
        "    to: ops@example.com\n"  # 10
        "    template: 'Hello $caller'\n"  # 11
        "rules:\n"  # 12
        "  - name: one\n"  # 13
        "    when: sentiment <> 5\n"  # 14
        "    channels: [mail]\n"  # 15
        "  - name: two\n"  # 16
        "    when: {all: []}\n"  # 17
        "    channels: [pager]\n"  # 18
        "  - name: one\n"  # 19
        "    enabled: false\n"  # 20
        "    when: sentiment < 5\n"  # 21
        "    channels: [mail]\n"  # 22
        "  - name: three\n"  # 23
        "    when: |\n"  # 24
        "      sentiment < 5\n"  # 25
        "      and = 3\n"  # 26
        "    chanels: [mail]\n",  # 27
        encoding="utf-8",
    )
    with pytest.raises(RuleFileError) as caught:
        load_rule_file(path, {})
    text = str(caught.value)
    expected = [
        f"{path}:5: channel 'hook': unknown key 'secret': secrets come from the environment",
        f"{path}:3: channel 'hook': needs `secret_env`",
        f"{path}:9: channel 'mail': `from` must be one e-mail address",
        f"{path}:11: channel 'mail': `template` uses unknown placeholder(s) $caller",
        f"{path}:14:22: rule 'one': condition: unexpected '>'",
        f"{path}:17: rule 'two': `all` needs a non-empty list",
        f"{path}:18: rule 'two': channel 'pager' is not defined",
        f"{path}:19: rule 'one' is already defined on line 13",
        f"{path}:27: rule 'three': unknown key 'chanels'",
        f"{path}:26: rule 'three': condition: unexpected '='",
    ]
    for line in expected:
        assert line in text, f"missing: {line}\n--- got:\n{text}"


def test_a_secret_named_but_not_set_stops_the_start(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    env["CALLSTREAM_ALERT_RULES"] = str(rule_file(tmp_path, {"hook": webhook("https://x.test/")}))
    del env["TEST_WEBHOOK_SECRET"]
    with pytest.raises(RuleFileError, match=r"TEST_WEBHOOK_SECRET .* is not set"):
        build(env, CollectorRegistry())


async def test_without_a_rule_file_nothing_alerts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "callstream.alerting")
    async with running(tmp_path) as (consumer, registry):
        await consumer.handle([delivery(payload())])
    assert not consumer.rules.rules
    assert "CALLSTREAM_ALERT_RULES is not set" in caplog.text
    assert metric(registry, "callstream_alerts_sent_total", channel_type="slack") == 0


# -- privacy ------------------------------------------------------------------------------

LEAKY: dict[str, Any] = {
    "summaryText": "Beller (06-12345678, jan@example.nl) wil teruggebeld worden, "
    "zie https://intern.example.com/klant/42?token=SECRET en portal.example.com/x.",
    "transcriptText": "Gebruiker: mijn nummer is +31 6 1234 5678.\n"
    "AI: dank u, zie www.example.org of example.net voor meer. Prima.Tot ziens. " + "Blah " * 200,
}


def assert_privacy_safe(text: str) -> None:
    for leak in (
        SAMPLE_CALLER,
        "12345678",
        "1234 5678",
        "jan@example.nl",
        "http",
        "example.com",
        "example.org",
        "example.net",
        "SECRET",
        "EXAMPLE_TOKEN",
        "supabase",
    ):
        assert leak not in text, f"{leak!r} leaked into {text!r}"


def test_privacy_safe_text_masks_numbers_and_drops_links() -> None:
    text = privacy_safe(LEAKY["summaryText"] + " " + LEAKY["transcriptText"])
    assert_privacy_safe(text)
    assert "[link]" in text
    assert "[e-mail]" in text
    assert "06******78" in text
    assert "Prima.Tot ziens" in text
    assert privacy_safe("score 9 op 10, 132.5 s") == "score 9 op 10, 132.5 s"


# -- channels -----------------------------------------------------------------------------


async def test_slack_channel_posts_the_rendered_text(tmp_path: Path, receiver: Receiver) -> None:
    channels = {"ops": slack(receiver.url("/slack"))}
    async with running(tmp_path, channels) as (consumer, registry):
        report = delivery(payload(**LEAKY))
        await consumer.handle([report])
    (hit,) = receiver.of("/slack")
    body = hit.json()
    assert list(body) == ["text"]
    text = body["text"]
    assert text.startswith("*alarm*: call " + report.report.call_id)
    assert "+31*******37" in text
    assert "sentiment=9" in text
    assert_privacy_safe(text)
    assert len(text) < 1200
    assert metric(registry, "callstream_alerts_sent_total", channel_type="slack") == 1


async def test_webhook_channel_signs_timestamp_and_body(tmp_path: Path, receiver: Receiver) -> None:
    channels = {"crm": webhook(receiver.url("/hook"), template="$rule for $from_number")}
    async with running(tmp_path, channels, when="vervolgactie_nodig") as (consumer, _):
        sent = delivery(payload(**LEAKY))
        await consumer.handle([sent])
    report = sent.report
    (hit,) = receiver.of("/hook")  # the receiver answered 401 on a bad signature
    body = hit.json()
    assert body["rule"] == "alarm"
    assert body["channel"] == "crm"
    assert body["call_id"] == report.call_id
    assert body["text"] == "alarm for +31*******37"
    assert body["from_number"] == "+31*******37"
    assert body["matched"] == {"vervolgactie_nodig": True}
    assert body["alert_id"] == hit.headers["X-Callstream-Alert-Id"]
    assert "recording_url" not in body
    assert_privacy_safe(hit.body.decode())


async def test_email_channel_sends_the_rendered_mail(tmp_path: Path, smtp: Smtp) -> None:
    channels = {"mail": email(smtp.port, subject="Alarm $rule voor $from_number")}
    async with running(tmp_path, channels) as (consumer, registry):
        report = delivery(payload(**LEAKY))
        await consumer.handle([report])
    ((_, message),) = smtp.mailbox.messages
    assert message["Subject"] == "Alarm alarm voor +31*******37"
    assert message["To"] == "ops@callstream.test"
    assert message["Message-ID"].endswith("@callstream.alerting>")
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert report.report.call_id in text
    assert "Transcript excerpt:" in text
    assert_privacy_safe(text)
    assert metric(registry, "callstream_alerts_sent_total", channel_type="email") == 1


# -- exactly once -------------------------------------------------------------------------


async def test_a_report_delivered_again_alerts_only_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    channels = {"ops": slack(receiver.url("/slack"))}
    raw = payload()
    async with running(tmp_path, channels) as (consumer, registry):
        await consumer.handle([delivery(raw), delivery(raw)])  # twice in one batch
        await consumer.handle([delivery(raw)])  # redelivered
    async with running(tmp_path, channels) as (consumer, second):
        await consumer.handle([delivery(raw)])  # a replay after a restart
    assert len(receiver.of("/slack")) == 1
    assert metric(registry, "callstream_alerts_suppressed_duplicates_total") == 2
    assert metric(second, "callstream_alerts_suppressed_duplicates_total") == 1


async def test_an_alert_interrupted_mid_send_is_sent_again_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    raw = payload()
    call_id = raw["callId"]
    # What a crash between "sending" and "sent" leaves behind.
    state = AlertState(tmp_path / "state" / "alerting.db")
    await state.open()
    assert await state.claim([AlertKey("alarm", call_id, "ops")]) == {
        AlertKey("alarm", call_id, "ops"): "new"
    }
    await state.close()
    channels = {"ops": slack(receiver.url("/slack"))}
    async with running(tmp_path, channels) as (consumer, _):
        await consumer.handle([delivery(raw)])
        await consumer.handle([delivery(raw)])
    assert len(receiver.of("/slack")) == 1
    state = AlertState(tmp_path / "state" / "alerting.db")
    await state.open()
    assert await state.status(AlertKey("alarm", call_id, "ops")) == "sent"
    await state.close()


async def test_a_locked_state_database_is_retryable_and_sends_nothing(
    tmp_path: Path, receiver: Receiver
) -> None:
    channels = {"ops": slack(receiver.url("/slack"))}
    raw = payload()
    async with running(tmp_path, channels) as (consumer, _):
        with closing(
            sqlite3.connect(tmp_path / "state" / "alerting.db", isolation_level=None)
        ) as other:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(RetryableError, match="alert state unavailable"):
                await consumer.handle([delivery(raw)])
            other.execute("ROLLBACK")
        assert receiver.of("/slack") == []
        await consumer.handle([delivery(raw)])
    assert len(receiver.of("/slack")) == 1


# -- retries, dead letters, destinations ----------------------------------------------------


async def test_429_retry_after_is_honoured(tmp_path: Path, receiver: Receiver) -> None:
    channels = {"ops": slack(receiver.url("/limited"))}
    async with running(tmp_path, channels) as (consumer, registry):
        await consumer.handle([delivery(payload())])
    first, second = receiver.of("/limited")
    assert second.at - first.at >= 0.95
    assert (
        metric(
            registry, "callstream_alerts_failed_total", channel_type="slack", reason="rate_limited"
        )
        == 1
    )
    assert metric(registry, "callstream_alerts_sent_total", channel_type="slack") == 1
    assert dead_letters(tmp_path) == []


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("garbage") is None
    now = parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")
    assert now == 0.0  # a date in the past means now


async def test_a_failing_webhook_is_dead_lettered_without_holding_up_email(
    tmp_path: Path, receiver: Receiver, smtp: Smtp
) -> None:
    channels = {"broken": webhook(receiver.url("/broken")), "mail": email(smtp.port)}
    async with running(tmp_path, channels) as (consumer, registry):
        await consumer.handle([delivery(payload())])
    assert len(smtp.mailbox.messages) == 1
    assert len(receiver.of("/broken")) == 3
    assert dead_letters(tmp_path) == [("alarm", "broken", "webhook", "server_error", 3)]
    assert metric(registry, "callstream_alerts_dead_lettered_total", channel_type="webhook") == 1
    assert (
        metric(
            registry,
            "callstream_alerts_failed_total",
            channel_type="webhook",
            reason="server_error",
        )
        == 3
    )


async def test_a_4xx_is_dead_lettered_at_once(tmp_path: Path, receiver: Receiver) -> None:
    async with running(tmp_path, {"gone": slack(receiver.url("/gone"))}) as (consumer, _):
        await consumer.handle([delivery(payload())])
    assert len(receiver.of("/gone")) == 1
    assert dead_letters(tmp_path) == [("alarm", "gone", "slack", "client_error", 1)]


async def test_a_hanging_receiver_times_out_and_is_dead_lettered(
    tmp_path: Path, receiver: Receiver, smtp: Smtp
) -> None:
    channels = {"slow": slack(receiver.url("/hang")), "mail": email(smtp.port)}
    async with running(
        tmp_path,
        channels,
        CALLSTREAM_ALERT_TIMEOUT_SECONDS="1",
        CALLSTREAM_ALERT_MAX_ATTEMPTS="2",
    ) as (consumer, _):
        # /hang never answers on its own: without the per-attempt timeout this never returns.
        await asyncio.wait_for(consumer.handle([delivery(payload())]), 60)
    assert len(receiver.of("/hang")) == 2
    assert dead_letters(tmp_path) == [("alarm", "slow", "slack", "timeout", 2)]
    # the mail went out while the webhook's first attempt was still hanging: channels run
    # concurrently (one after the other, the mail would follow both timed-out attempts)
    ((mailed_at, _),) = smtp.mailbox.messages
    assert mailed_at < receiver.of("/hang")[0].at + 1.0


async def test_a_redirect_to_a_refused_address_is_not_followed(
    tmp_path: Path, receiver: Receiver
) -> None:
    # A second receiver on another loopback address: allowed networks cover only the first,
    # so the redirect must be refused before any connection reaches this one.
    internal = Receiver(host="127.0.0.2")
    await internal.start()
    try:
        targets = [
            internal.url("/slack"),
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/admin",
        ]
        channels = {
            f"r{i}": slack(receiver.url("/redirect") + "?to=" + target)
            for i, target in enumerate(targets)
        }
        async with running(tmp_path, channels, CALLSTREAM_ALERT_TIMEOUT_SECONDS="1") as (
            consumer,
            _,
        ):
            await consumer.handle([delivery(payload())])
    finally:
        await internal.stop()
    assert internal.hits == {}
    assert len(receiver.of("/redirect")) == 3
    assert sorted(dead_letters(tmp_path)) == [
        ("alarm", f"r{i}", "slack", "destination_refused", 1) for i in range(3)
    ]


async def test_a_redirect_to_an_allowed_address_is_followed(
    tmp_path: Path, receiver: Receiver
) -> None:
    channels = {"ops": webhook(receiver.url("/redirect") + "?to=/hook")}
    async with running(tmp_path, channels) as (consumer, _):
        await consumer.handle([delivery(payload())])
    assert len(receiver.of("/redirect")) == 1
    assert len(receiver.of("/hook")) == 1  # signature checked there
    assert dead_letters(tmp_path) == []


async def test_a_host_name_resolving_to_a_refused_address_is_refused(
    tmp_path: Path, receiver: Receiver
) -> None:
    channels = {"ops": slack(f"http://localhost:{receiver.port}/slack")}
    async with running(tmp_path, channels, CALLSTREAM_ALERT_ALLOWED_NETWORKS="192.0.2.0/24") as (
        consumer,
        _,
    ):
        await consumer.handle([delivery(payload())])
    assert receiver.hits == {}
    assert dead_letters(tmp_path) == [("alarm", "ops", "slack", "destination_refused", 1)]
    with closing(sqlite3.connect(tmp_path / "state" / "alerting.db")) as conn:
        (detail,) = conn.execute("SELECT detail FROM alert_dead_letters").fetchone()
    assert "localhost resolves only to refused addresses" in detail


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("169.254.169.254", True),
        ("224.0.0.1", True),
        ("0.0.0.0", True),  # noqa: S104 - an address under test; nothing binds it
        ("240.0.0.1", True),
        ("100.64.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("fe80::1", True),
        ("2001:4860:4860::8888", False),
    ],
)
def test_network_policy_refuses_non_public_addresses(address: str, refused: bool) -> None:
    policy = NetworkPolicy()
    assert (policy.refusal(ipaddress.ip_address(address)) is not None) is refused
    allowed = NetworkPolicy.parse("127.0.0.0/8, ::1/128")
    assert allowed.refusal(ipaddress.ip_address("127.0.0.5")) is None
    assert allowed.refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None


# -- rate limit and metrics ---------------------------------------------------------------


async def test_the_rate_limit_spaces_sends_to_one_channel(
    tmp_path: Path, receiver: Receiver
) -> None:
    channels = {"ops": slack(receiver.url("/slack"), rate={"per_second": 5, "burst": 1})}
    async with running(tmp_path, channels) as (consumer, _):
        await consumer.handle([delivery(payload()) for _ in range(4)])
    times = sorted(hit.at for hit in receiver.of("/slack"))
    assert len(times) == 4
    # 5 a second with a burst of 1: four sends span 0.6 s (unlimited: a few ms; a burst of
    # 2: 0.4 s). Measured at the receiver, where a stall can delay the first hit a little.
    assert times[-1] - times[0] >= 0.45, times


async def test_metric_labels_carry_no_call_ids_or_numbers(
    tmp_path: Path, receiver: Receiver
) -> None:
    channels = {"ops": slack(receiver.url("/slack")), "broken": webhook(receiver.url("/broken"))}
    raw = payload()
    async with running(tmp_path, channels) as (consumer, registry):
        await consumer.handle([delivery(raw), delivery(raw)])
    labels = [
        (name, value)
        for family in registry.collect()
        for sample in family.samples
        for name, value in sample.labels.items()
    ]
    assert labels
    assert {name for name, _ in labels} <= {"channel_type", "reason", "le"}
    for _, value in labels:
        assert raw["callId"] not in value
        assert "3162373" not in value
