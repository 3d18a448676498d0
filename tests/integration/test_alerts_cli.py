"""`callstream alerts list` and `callstream alerts retry`, run as the operator runs them,
against the state file the real alerting consumer wrote on the real broker, and a real
webhook receiver that fails until it is fixed.

Oracle: the receiver's own record of what reached it (how many requests, their alert ids and
bodies), and the commands' exit codes and JSON lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
from consumers.alerting import AlertState, build
from core.kafkasettings import KafkaSettings
from tests.support.alerting import email_channel
from tests.support.cli import run_cli
from tests.support.produce import produce_reports, sample_report
from tests.support.runner import eventually, running

SECRET = "alerts-cli-hook-secret"
CALLER = "+31623731537"  # the sample's caller


@dataclass
class Hook:
    """A signed-webhook receiver that answers 500 while `broken`, and keeps every request."""

    broken: bool = True
    requests: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers.get("X-Callstream-Timestamp", "")
        expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
        if request.headers.get("X-Callstream-Signature") != f"sha256={expected.hexdigest()}":
            status = 401
        else:
            status = 500 if self.broken else 204
        self.requests.append((status, dict(request.headers), body))
        return web.Response(status=status)

    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for status, headers, body in self.requests if status == 204]


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    receiver = Hook()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def write_rules(path: Path, channels: dict[str, Any]) -> None:
    spec = {
        "channels": channels,
        "rules": [{"name": "happy-caller", "when": "sentiment >= 9", "channels": list(channels)}],
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def alerting_env(
    tmp_path: Path, hook: Hook, channels: dict[str, Any] | None = None
) -> dict[str, str]:
    """The alerting consumer's settings (one rule notifying `channels`, by default the hook):
    the commands run with the same ones."""
    rules = tmp_path / "rules.yaml"
    hook_channel = {"type": "webhook", "url": hook.url, "secret_env": "HOOK_SECRET"}
    write_rules(rules, channels or {"hook": hook_channel})
    return {
        "CALLSTREAM_ALERT_RULES": str(rules),
        "CALLSTREAM_ALERT_STATE_PATH": str(tmp_path / "alerting.db"),
        "CALLSTREAM_ALERT_ALLOWED_NETWORKS": "127.0.0.1/32",
        "CALLSTREAM_ALERT_MAX_ATTEMPTS": "2",
        "CALLSTREAM_ALERT_TIMEOUT_SECONDS": "5",
        "CALLSTREAM_ALERT_BACKOFF_SECONDS": "0.05",
        "CALLSTREAM_ALERT_BACKOFF_MAX_SECONDS": "0.1",
        "CALLSTREAM_ALERT_RETRY_BUDGET_SECONDS": "30",
        "HOOK_SECRET": SECRET,
    }


def cli_env(alerting: dict[str, str]) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    return inherited | alerting | {"CALLSTREAM_LOG_LEVEL": "WARNING"}


async def alerts(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_cli, "alerts", *args, env=env)
    return done.returncode, done.stdout, done.stderr


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines()]


async def dead_lettered_by_the_consumer(
    kafka: KafkaSettings, env: dict[str, str], hook: Hook
) -> str:
    """One report through the real alerting consumer on the real broker while the hook is
    broken: the alert is given up on after its two attempts. Returns the call id."""
    [call_id] = await produce_reports(kafka, [sample_report()])
    consumer = build(env, CollectorRegistry())
    state = Path(env["CALLSTREAM_ALERT_STATE_PATH"])

    def given_up() -> bool:
        if not state.exists():
            return False
        with closing(sqlite3.connect(state)) as conn:
            try:
                return bool(conn.execute("SELECT count(*) FROM alert_dead_letters").fetchone()[0])
            except sqlite3.OperationalError:  # the consumer is still laying the file out
                return False

    async with running(consumer, kafka, f"alerting-{uuid.uuid4().hex[:8]}"):
        await eventually(given_up, timeout=60)
    return call_id


@dataclass
class GivenUp:
    alerting: dict[str, str]  # the consumer's settings
    env: dict[str, str]  # the command's environment
    call_id: str
    state: Path


@pytest.fixture
async def given_up(tmp_path: Path, kafka: KafkaSettings, hook: Hook) -> GivenUp:
    alerting = alerting_env(tmp_path, hook)
    call_id = await dead_lettered_by_the_consumer(kafka, alerting, hook)
    state = Path(alerting["CALLSTREAM_ALERT_STATE_PATH"])
    return GivenUp(alerting, cli_env(alerting), call_id, state)


async def test_a_dead_lettered_alert_is_listed_and_sent_again_once_with_its_alert_id(
    given_up: GivenUp, hook: Hook
) -> None:
    env, call_id = given_up.env, given_up.call_id
    assert [status for status, _, _ in hook.requests] == [500, 500]
    first_headers, first_body = hook.requests[0][1], hook.requests[0][2]
    alert_id = first_headers["X-Callstream-Alert-Id"]
    assert orjson.loads(first_body)["alert_id"] == alert_id

    code, out, err = await alerts(env, "list", "--failed", "--json")
    assert (code, err) == (0, "")
    [failed] = json_lines(out)
    assert failed["rule"] == "happy-caller"
    assert failed["channel"] == "hook"
    assert failed["call_id"] == call_id
    assert failed["status"] == "dead_lettered"
    assert failed["attempts"] == 2
    assert failed["error"].startswith("server_error: gave up after 2 attempts")
    dead_letter = failed["dead_letter_id"]
    assert isinstance(dead_letter, int)

    hook.broken = False
    code, out, err = await alerts(env, "retry", "--dry-run")
    assert (code, err) == (0, ""), out
    assert f"would send  #{dead_letter} rule=happy-caller channel=hook call={call_id}" in out
    assert len(hook.requests) == 2  # a dry run sends nothing

    code, out, err = await alerts(env, "retry")
    assert (code, err) == (0, ""), out
    assert f"sent        #{dead_letter} rule=happy-caller" in out
    [(headers, body)] = hook.delivered()
    assert headers["X-Callstream-Alert-Id"] == alert_id
    # The alert as the consumer sent it, byte for byte: same id, same masked number, no more.
    assert body == first_body
    assert CALLER not in body.decode()
    assert orjson.loads(body)["from_number"] == orjson.loads(first_body)["from_number"]

    code, out, err = await alerts(env, "retry")
    assert (code, out.strip(), err) == (0, "nothing to retry", "")
    code, out, err = await alerts(env, "retry", "--id", str(dead_letter))
    assert code == 0, err
    assert out.startswith(f"skipped     #{dead_letter} rule=happy-caller channel=hook")
    assert ": already delivered by a retry at " in out
    assert len(hook.requests) == 3

    code, out, err = await alerts(env, "list", "--json")
    assert code == 0, err
    [sent] = json_lines(out)
    assert sent["status"] == "sent"
    assert sent["error"] is None
    assert sent["attempts"] == 1
    assert sent["retries"] == 1
    assert sent["dead_letter_id"] == dead_letter
    code, out, err = await alerts(env, "list", "--failed", "--json")
    assert (code, out, err) == (0, "", "")  # valid JSON lines when empty: none at all


async def test_list_since_takes_iso_times_and_ages(given_up: GivenUp, hook: Hook) -> None:
    env, call_id = given_up.env, given_up.call_id
    for since in ("-1h", "-2d", "-90m", "2020-01-01T00:00Z", "2020-01-01"):
        code, out, err = await alerts(env, "list", "--since", since, "--json")
        assert code == 0, err
        assert [line["call_id"] for line in json_lines(out)] == [call_id], since
    tomorrow = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    code, out, err = await alerts(env, "list", "--since", tomorrow, "--json")
    assert (code, out) == (0, "")
    code, out, err = await alerts(env, "retry", "--since", tomorrow, "--dry-run")
    assert (code, out.strip()) == (0, "nothing to retry")
    code, out, err = await alerts(env, "retry", "--since=-1h", "--dry-run")
    assert code == 0, err
    assert out.startswith("would send")
    code, out, err = await alerts(env, "list", "--failed")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["UPDATED", "STATUS", "DEAD"]
    assert row.split()[1:6] == ["dead_lettered", "#1", "happy-caller", "hook", call_id]
    assert "server_error: gave up after 2 attempts" in row


async def test_a_retry_to_a_channel_no_longer_in_the_rule_file_fails_for_that_alert(
    given_up: GivenUp, hook: Hook
) -> None:
    env = given_up.env
    write_rules(
        Path(given_up.alerting["CALLSTREAM_ALERT_RULES"]),
        {"other": {"type": "webhook", "url": hook.url, "secret_env": "HOOK_SECRET"}},
    )
    hook.broken = False

    code, out, err = await alerts(env, "retry", "--dry-run")
    assert code == 0, err
    gone = "channel 'hook' is no longer in the rule file"
    assert out.startswith("would fail  #1 rule=happy-caller channel=hook")
    assert gone in out
    code, out, err = await alerts(env, "retry")
    assert code == 1, out + err
    assert out.startswith("failed      #1 rule=happy-caller channel=hook")
    assert gone in out
    assert len(hook.requests) == 2  # the consumer's two, nothing more

    code, out, err = await alerts(env, "list", "--failed", "--json")
    [still] = json_lines(out)
    assert "no longer in the rule file" in still["error"]
    assert still["retries"] == 1
    assert still["attempts"] == 2  # nothing was sent, so the count stays the consumer's


async def test_a_retry_interrupted_mid_send_is_taken_over_only_once_its_budget_has_passed(
    given_up: GivenUp, hook: Hook
) -> None:
    env = given_up.env
    path = given_up.state
    # What a retry that crashed (or is still sending) leaves: its claim, and no outcome.
    state = AlertState(path)
    await state.open()
    assert await state.claim_retry(1, stale_before=datetime.now(UTC))
    await state.close()
    hook.broken = False

    code, out, err = await alerts(env, "retry")
    assert code == 0, err
    assert out.startswith("skipped     #1 rule=happy-caller channel=hook")
    assert "another retry is sending it" in out
    assert len(hook.requests) == 2  # not sent beside the other retry

    # Older than the retry budget (30 s) and one attempt's timeout (5 s): that retry is over.
    with closing(sqlite3.connect(path)) as conn, conn:
        long_ago = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
        conn.execute("UPDATE alert_dead_letters SET retry_started_at = ?", (long_ago,))
    code, out, err = await alerts(env, "retry")
    assert code == 0, err
    assert out.startswith("sent        #1 rule=happy-caller channel=hook")
    assert len(hook.delivered()) == 1


class RefusingMailbox:
    """An SMTP server's handler: "try again later" (451) while `broken`; keeps every message
    it was offered, taken or not."""

    def __init__(self) -> None:
        self.broken = True
        self.offered: list[tuple[str, EmailMessage]] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        answer = "451 4.3.0 try again later" if self.broken else "250 OK"
        self.offered.append((answer, message))
        return answer


@pytest.fixture
def mailbox() -> Iterator[tuple[RefusingMailbox, int]]:
    handler = RefusingMailbox()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


async def test_a_given_up_e_mail_is_sent_again_with_its_message_id(
    tmp_path: Path, kafka: KafkaSettings, hook: Hook, mailbox: tuple[RefusingMailbox, int]
) -> None:
    handler, port = mailbox
    alerting = alerting_env(tmp_path, hook, {"mail": email_channel(port)})
    env = cli_env(alerting)
    await dead_lettered_by_the_consumer(kafka, alerting, hook)
    assert [answer[:3] for answer, _ in handler.offered] == ["451", "451"]
    code, out, _ = await alerts(env, "list", "--failed", "--json")
    [failed] = json_lines(out)
    assert (failed["channel_type"], failed["error"][:15]) == ("email", "smtp_temporary:")

    handler.broken = False
    code, out, err = await alerts(env, "retry")
    assert code == 0, out + err
    assert out.startswith("sent        #1 rule=happy-caller channel=mail")
    (_, first), (_, second), (taken, resent) = handler.offered
    assert taken == "250 OK"
    assert resent["Message-ID"] == first["Message-ID"] == second["Message-ID"]
    assert resent["Message-ID"].endswith("@callstream.alerting>")
    assert resent["Subject"] == first["Subject"]
    assert resent.get_content() == first.get_content()
    assert CALLER not in resent.as_string()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list",), "no alert state file at"),
        (("retry", "--dry-run"), "no alert state file at"),
        (("list", "--since", "yesterday"), "--since 'yesterday': give an ISO time"),
    ],
)
def test_errors_are_one_line_and_exit_code_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    env = cli_env({"CALLSTREAM_ALERT_STATE_PATH": str(tmp_path / "missing" / "alerting.db")})
    done = run_cli("alerts", *args, env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert message in done.stderr
    assert not (tmp_path / "missing").exists()  # a wrong path is not created


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a database at all, but a stray file" * 100, "file is not a database"),
        (None, "has layout v3, newer than this release's v2"),
    ],
)
def test_a_state_file_it_cannot_read_is_one_line_and_exit_code_2(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "alerting.db"
    if content is None:
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA user_version = 3")
    else:
        path.write_bytes(content)
    rules = tmp_path / "rules.yaml"
    hook = {"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret_env": "HOOK_SECRET"}
    write_rules(rules, {"hook": hook})
    env = cli_env(
        {
            "CALLSTREAM_ALERT_STATE_PATH": str(path),
            "CALLSTREAM_ALERT_RULES": str(rules),
            "HOOK_SECRET": SECRET,
        }
    )
    for command in ("list", "retry"):
        done = run_cli("alerts", command, env=env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr


async def test_an_unknown_dead_letter_id_is_one_line_and_exit_code_2(
    tmp_path: Path, hook: Hook
) -> None:
    alerting = alerting_env(tmp_path, hook)
    path = Path(alerting["CALLSTREAM_ALERT_STATE_PATH"])
    state = AlertState(path)
    await state.open()
    await state.close()
    code, out, err = await alerts(cli_env(alerting), "retry", "--id", "42")
    assert (code, out) == (2, "")
    assert err.strip() == f"callstream alerts retry: no dead letter #42 in {path}"


V1_LAYOUT = """
CREATE TABLE alert_notifications (
    rule TEXT NOT NULL, call_id TEXT NOT NULL, channel TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('sending', 'sent', 'dead_lettered')),
    claims INTEGER NOT NULL DEFAULT 1, attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (rule, call_id, channel)
) WITHOUT ROWID;
CREATE TABLE alert_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL, call_id TEXT NOT NULL,
    channel TEXT NOT NULL, channel_type TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, attempts INTEGER NOT NULL, created_at TEXT NOT NULL
);
CREATE INDEX alert_dead_letters_call ON alert_dead_letters (call_id);
INSERT INTO alert_notifications VALUES
    ('happy-caller', 'old-call', 'hook', 'dead_lettered', 1, 5,
     '2026-11-01T10:00:00.000Z', '2026-11-01T10:00:02.000Z');
INSERT INTO alert_dead_letters
    (rule, call_id, channel, channel_type, reason, detail, attempts, created_at) VALUES
    ('happy-caller', 'old-call', 'hook', 'webhook', 'server_error', 'gave up', 5,
     '2026-11-01T10:00:02.000Z');
PRAGMA user_version = 1;
"""


async def test_a_state_file_from_the_previous_release_is_migrated_and_its_alerts_listed(
    tmp_path: Path, hook: Hook
) -> None:
    alerting = alerting_env(tmp_path, hook)
    path = Path(alerting["CALLSTREAM_ALERT_STATE_PATH"])
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(V1_LAYOUT)
    env = cli_env(alerting)
    code, out, err = await alerts(env, "list", "--failed", "--json")
    assert code == 0, err
    [old] = json_lines(out)
    assert (old["call_id"], old["status"], old["error"]) == (
        "old-call",
        "dead_lettered",
        "server_error: gave up",
    )
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        columns = {row[1] for row in conn.execute("PRAGMA table_info(alert_dead_letters)")}
    assert {"context", "retry_started_at", "retries", "resolved_at"} <= columns

    hook.broken = False
    code, out, err = await alerts(env, "retry")
    assert code == 1, err
    assert "did not keep the alert's text; cannot resend" in out
    assert hook.requests == []
