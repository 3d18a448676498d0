"""The ingress application: `create_app(settings)` builds it, handlers stay thin.

POST /webhooks/flireo: authenticate -> read -> parse -> normalise -> encode -> publish, then
202, or for an event that expects a reply (assistant-request, tool-calls, ...) that reply.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.multiprocess import MultiProcessCollector

from core import heap
from core.signing import WEBHOOK_PATH
from ingress import hygiene, openapi, ratelimit
from ingress.auth import Authenticator
from ingress.body import BodyTooLarge, decode_content, read_wire_body
from ingress.errors import Problem, invalid, log_refusal
from ingress.kafkapublisher import PublishUnavailable, RecordTooLarge
from ingress.publisher import Durable, DurablePublisher, OutgoingRecord
from ingress.quarantine import Quarantine
from ingress.replays import RecentDeliveries, delivery_key
from ingress.replies import Replies
from ingress.settings import IngressSettings
from ingress.sharedreplays import SharedDeliveries
from ingress.takeover import Takeover
from ingress.telemetry import IngressMetrics, Sampled
from schemas import jsonvalue
from schemas.codec import Encoder, encoders_for
from schemas.errors import InvalidReport, SchemaError
from schemas.headers import RecordHeaders
from schemas.normalise import Normalised, normalise
from schemas.store import END_OF_CALL_REPORT, REJECTED_REQUEST, SchemaStore, default_store

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", IngressSettings)
PUBLISHER = web.AppKey("publisher", DurablePublisher)
METRICS = web.AppKey("metrics", IngressMetrics)
AUTH = web.AppKey("auth", Authenticator)
ENCODERS = web.AppKey("encoders", dict[str, Encoder])
REPLIES = web.AppKey("replies", Replies)
# Replay detection: this process's memory, or the one all workers of one ingress share.
RECENT: web.AppKey[RecentDeliveries | SharedDeliveries] = web.AppKey("recent")
QUARANTINE = web.AppKey("quarantine", Quarantine)
REQUEST_ID = web.RequestKey("request_id", str)

# aiohttp would otherwise inflate gzip bodies itself, before the signature (which covers
# the bytes as sent) can be checked and without our decompressed-size limit.
RUNNER_OPTIONS: dict[str, Any] = {"auto_decompress": False, "access_log": None}
# How stale another worker's gauges may be in a scrape (ingress/telemetry.py Sampled).
SAMPLE_INTERVAL_SECONDS = 1.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(
    settings: IngressSettings,
    *,
    registry: CollectorRegistry | None = None,
    publisher: DurablePublisher | None = None,
    store: SchemaStore | None = None,
    metrics_dir: Path | None = None,
    replay_table: Path | None = None,
) -> web.Application:
    """`metrics_dir`: prometheus_client's multiprocess directory when this process is one
    of several workers (ingress/workers.py); /metrics then answers for all of them.
    `replay_table`: the workers' shared memory of recent deliveries (ingress/sharedreplays.py)."""
    registry = registry if registry is not None else CollectorRegistry()
    heap.register(registry)
    budget = hygiene.BodyBudget(settings.max_inflight_body_bytes)
    # The body limit is enforced by read_wire_body with a clear 413; aiohttp's own limit
    # must not fire first with a plain-text error.
    app = web.Application(
        middlewares=[
            problem_middleware,
            *hygiene.middlewares(budget, {WEBHOOK_PATH}),
            *ratelimit.middlewares(settings, {WEBHOOK_PATH}),
        ],
        client_max_size=settings.max_body_bytes + 1,
    )
    app[SETTINGS] = settings
    app[METRICS] = IngressMetrics(registry)
    app[PUBLISHER] = publisher or DurablePublisher.from_settings(settings, app[METRICS].spool)
    durable = app[PUBLISHER]
    # Computed at scrape time, so the gauge is true even when nothing probes /readyz.
    sampled = app[METRICS].sampled
    sampled.bind(app[METRICS].ready, lambda: 1.0 if durable.readiness().ready else 0.0)
    sampled.bind(app[METRICS].inflight_body_bytes, lambda: budget.held)
    app[REPLIES] = Replies(settings)
    app[AUTH] = Authenticator(
        settings.webhook_secrets, settings.shared_tokens, settings.signature_tolerance_seconds
    )
    app[QUARANTINE] = Quarantine(durable, settings, app[AUTH], app[METRICS])
    # A timestamp is accepted this far on either side of the server's clock.
    window = 2.0 * settings.signature_tolerance_seconds
    app[RECENT] = (
        RecentDeliveries(window)
        if replay_table is None
        # A replay waits for the first at most as long as the first may take to be durable.
        else SharedDeliveries(replay_table, window, settings.publish_timeout_seconds)
    )
    app.cleanup_ctx.append(app[RECENT].sweeper)
    app.cleanup_ctx.append(_resources(store or default_store()))
    app.cleanup_ctx.append(hygiene.memory_trimmer)
    app.router.add_post(WEBHOOK_PATH, receive_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", _metrics_handler(registry, sampled, metrics_dir))
    if metrics_dir is not None:
        app.on_startup.append(lambda _: sampled.start(SAMPLE_INTERVAL_SECONDS))
        app.on_cleanup.append(lambda _: sampled.stop())
    app.router.add_get(openapi.PATH, openapi.handler(settings))
    return app


def _metrics_handler(
    registry: CollectorRegistry, sampled: Sampled, metrics_dir: Path | None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    if metrics_dir is None:
        return make_aiohttp_handler(registry)
    # Every worker's files, whichever worker the scrape reached: Prometheus sees one target.
    shared = CollectorRegistry()
    MultiProcessCollector(shared, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    expose = make_aiohttp_handler(shared)

    async def handler(request: web.Request) -> web.StreamResponse:
        sampled.refresh()  # the answering worker's own gauges are exact, the others' 1 s old
        return await expose(request)

    return handler


def _resources(store: SchemaStore) -> Callable[[web.Application], AsyncIterator[None]]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        if not app[AUTH].enabled:
            log.warning(
                "NO WEBHOOK AUTHENTICATION: CALLSTREAM_WEBHOOK_SECRET and CALLSTREAM_SHARED_TOKEN "
                "are unset, so anyone who can reach %s can post reports",
                WEBHOOK_PATH,
            )
        publisher = app[PUBLISHER]
        async with aiohttp.ClientSession() as session:
            app[ENCODERS] = await encoders_for(settings.kafka, store, session)
            app[QUARANTINE].bind(app[ENCODERS][REJECTED_REQUEST])
            await publisher.start()
            # Draining siblings' left-over spools: only for a spool in a known place.
            takeover = None
            if settings.spool_dir is not None:
                metrics = app[METRICS].spool
                takeover = Takeover(settings.spool_dir, settings, publisher.kafka, metrics)
            try:
                yield
            finally:
                if takeover is not None:
                    await takeover.stop()
                await publisher.stop()

    return resources


@web.middleware
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every refusal is problem+json; nothing escapes as a bare 500."""
    supplied = request.headers.get("X-Request-Id", "")
    request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except Problem as problem:
        metrics.outcome(problem.slug)
        log_refusal(request_id, problem)
        response = problem.response(request_id)
    except web.HTTPException as exc:
        slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(
            exc.status, "invalid-request"
        )
        metrics.outcome(slug)
        refused = Problem(exc.status, slug, exc.reason, exc.text or exc.reason)
        log_refusal(request_id, refused)
        response = refused.response(request_id)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
    except Exception:
        log.exception("unexpected error handling request %s", request_id)
        metrics.outcome("internal-error")
        response = Problem(500, "internal-error", "Internal error", "see the ingress log").response(
            request_id
        )
    if request.path == WEBHOOK_PATH:
        metrics.request_duration.observe(time.perf_counter() - started)
    response.headers["X-Request-Id"] = request_id
    return response


async def receive_webhook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    auth = request.app[AUTH]
    # What the headers alone can refuse is refused before a byte of the body is buffered.
    auth.check_headers(request.headers)
    try:
        wire = await read_wire_body(
            request,
            settings.max_body_bytes,
            settings.body_timeout_seconds,
            request[hygiene.BODY_ALLOWANCE],
        )
    except BodyTooLarge as too_large:
        await request.app[QUARANTINE].keep_oversized(request, request[REQUEST_ID], too_large)
        raise
    metrics.received_bytes.inc(len(wire))
    how = auth.check(request.headers, wire)
    # Authenticated from here on: a refusal is kept before it is answered (ingress/quarantine).
    accept = functools.partial(
        request.app[QUARANTINE].keep_refused,
        request[REQUEST_ID],
        request.headers,
        wire,
        how,
        functools.partial(_accept, request, wire),
    )
    key = (
        delivery_key(request.headers) if how == "signature" and settings.replay_detection else None
    )
    if key is None:
        return await accept()
    response, replayed = await request.app[RECENT].answer(key, accept)
    if replayed:
        metrics.outcome("replayed")
    return response


async def _accept(request: web.Request, wire: bytes) -> web.Response:
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    body = decode_content(wire, request.headers.get("Content-Encoding"), settings.max_body_bytes)
    try:
        payload = jsonvalue.parse(body, max_depth=settings.max_json_depth)
    except InvalidReport as exc:
        raise invalid(exc.detail, exc.pointer or None, status=400) from exc
    request_id: str = request[REQUEST_ID]
    try:
        event = normalise(payload, received_at_ms=int(time.time() * 1000), request_id=request_id)
    except InvalidReport as exc:
        raise invalid(exc.detail, exc.pointer) from exc
    record = _outgoing(request.app, event, request_id)
    started = time.perf_counter()
    durable = await _publish(request.app, event, record)
    metrics.publish_duration.observe(time.perf_counter() - started)
    metrics.event(event.event_type, event.source_format)
    if event.kind == "request":
        # Kept first, then answered: the answer is what the sender acts on within seconds.
        response = request.app[REPLIES].answer(event, payload)
        metrics.outcome("answered")
        return response
    metrics.outcome("accepted")
    return web.Response(
        status=202,
        body=orjson.dumps(
            {
                "status": "accepted",
                "eventType": event.event_type,
                "callId": event.call_id,
                "requestId": request_id,
                "topic": record.topic,
                # "spool": on local disk, fsync'd; it reaches the topic once Kafka is back.
                "durable": durable,
            }
        ),
        content_type="application/json",
    )


async def _publish(app: web.Application, event: Normalised, record: OutgoingRecord) -> Durable:
    publisher = app[PUBLISHER]
    try:
        if event.kind != "request":
            return await publisher.publish(record)
        # The sender waits only seconds for a reply (Flireo 5 s): past the budget a 503
        # arrives while it still listens, rather than an answer after it gave up.
        deadline = app[SETTINGS].reply_deadline_seconds
        try:
            async with asyncio.timeout(deadline):
                return await publisher.publish(record)
        except TimeoutError as exc:
            raise PublishUnavailable(
                f"the event was not durable within the reply deadline of {deadline:g} s"
            ) from exc
    except RecordTooLarge as exc:
        # Telling the sender to retry would be a lie: the same report can never fit.
        raise Problem(413, "body-too-large", "Report too large", str(exc)) from exc
    except PublishUnavailable as exc:
        raise Problem(
            503,
            "unavailable",
            "Not durable yet",
            f"{exc}; the report was not kept, retry",
            headers={"Retry-After": str(exc.retry_after)},
        ) from exc


def _outgoing(app: web.Application, event: Normalised, request_id: str) -> OutgoingRecord:
    encoder = app[ENCODERS][event.schema_name]
    try:
        value = encoder.encode(event.record)
    except SchemaError as exc:
        raise invalid(str(exc)) from exc
    kafka = app[SETTINGS].kafka
    topic = kafka.topic if event.schema_name == END_OF_CALL_REPORT else kafka.events_topic
    return OutgoingRecord(
        topic=topic,
        key=event.call_id.encode() if event.call_id is not None else None,
        value=value,
        headers=RecordHeaders(
            event.event_type,
            encoder.schema_id,
            encoder.wire_format,
            event.source_format,
            request_id,
        ).encode(),
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while a report can be made durable: by Kafka, or else by the local spool."""
    state = request.app[PUBLISHER].readiness()
    return web.json_response(
        {
            "ready": state.ready,
            "durable": state.durable,
            "spool": {
                "records": state.spool_records,
                "bytes": state.spool_bytes,
                "oldestAgeSeconds": state.spool_oldest_age_seconds,
                # False after a failed write (a full or read-only disk) until one succeeds.
                "writable": state.spool_writable,
            },
        },
        status=200 if state.ready else 503,
    )
