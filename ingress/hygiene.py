"""What a client may hold: time to send its headers, idle connections, connections at once,
and bytes of body buffered across all requests.

aiohttp closes a connection that waits for its next request `keepalive_timeout` after the
previous response (or after connecting), but a client trickling a request's headers looks
to it like an idle one, so with a long keep-alive it holds the socket for as long. Here a
request's line and headers must also be complete within `header_timeout` of its first byte,
and connections past `max_connections` are answered 503 as soon as their headers arrive
(a well-behaved sender gets a problem+json answer with Retry-After rather than a reset).

Bodies are read only after the request's headers have passed the authentication check that
needs no body (ingress/auth.py); what is read is counted against one budget for the whole
process, so many senders stalling mid-body cannot grow the heap past it. Once they are gone,
glibc would keep the freed heap pages (bodies arrive as many small chunks, scattered through
its arenas); `memory_trimmer` hands them back to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

from ingress.errors import Problem

log = logging.getLogger(__name__)

# A refused sender retries after this; a second is enough for in-flight requests to finish.
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    max_connections: int


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with a deadline on each request's headers."""

    def __init__(self, manager: GuardedServer, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.limits = limits
        # Set once, at connect: this connection is past the cap and gets 503, then closes.
        self.over_capacity = False
        self._header_deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # Bytes while the connection waits for its next request are that request's start.
        # (Bytes during a request are its body, and bytes after an answer given before the
        # body was read are that body, which aiohttp reads off for its lingering time.)
        if self._header_deadline is None and self._awaiting_request() and data:
            self._header_deadline = self._loop.call_later(
                self.limits.header_timeout, self._headers_overdue
            )
        super().data_received(data)

    def _awaiting_request(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self._awaiting_request():
            self.force_close()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        self._cancel_header_deadline()
        if self.over_capacity:
            resp.force_close()
        return await super().finish_response(request, resp, start_time)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None


class GuardedServer(web.Server):
    """The aiohttp server the runner built, making GuardedHandlers and counting them."""

    def __init__(self, plain: web.Server, limits: ConnectionLimits) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self.limits = limits

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, self.limits, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if isinstance(handler, GuardedHandler) and len(self.connections) > (
            self.limits.max_connections
        ):
            handler.over_capacity = True


class BodyBudget:
    """Bytes of request bodies held at once, across every request of the process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def allowance(self) -> Iterator[Allowance]:
        allowance = Allowance(self)
        try:
            yield allowance
        finally:
            self.held -= allowance.taken


class Allowance:
    """One request's share of the BodyBudget, returned when the request is answered."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.taken = 0

    def take(self, size: int) -> None:
        budget = self._budget
        if budget.held + size > budget.limit:
            raise Problem(
                503,
                "busy",
                "Too many bodies in flight",
                f"the ingress already holds {budget.held} bytes of request bodies "
                f"(CALLSTREAM_MAX_INFLIGHT_BODY_BYTES is {budget.limit}); retry",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        budget.held += size
        self.taken += size


BODY_ALLOWANCE = web.RequestKey("body_allowance", Allowance)


def middlewares(budget: BodyBudget, guarded_paths: Collection[str]) -> list[Middleware]:
    """Refuses `guarded_paths` on a connection past the cap, and gives each such request its
    allowance of the body budget. Inside the problem middleware, so refusals are problem+json;
    probes and scrapes on other paths are always served."""
    paths = frozenset(guarded_paths)

    @web.middleware
    async def hygiene(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in paths:
            return await handler(request)
        protocol = request.protocol
        if isinstance(protocol, GuardedHandler) and protocol.over_capacity:
            raise Problem(
                503,
                "over-capacity",
                "Too many connections",
                f"the ingress serves {protocol.limits.max_connections} connections at once; "
                "retry on a new connection",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        with budget.allowance() as allowance:
            request[BODY_ALLOWANCE] = allowance
            return await handler(request)

    return [hygiene]


# Trimming walks the heap (milliseconds for a few hundred MiB), so it runs only while resident
# memory is this far above the least the process has needed.
TRIM_GROWTH_BYTES = 16 * 1024 * 1024
TRIM_INTERVAL_SECONDS = 5.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS) or resident memory
    cannot be read (no /proc)."""
    name = ctypes.util.find_library("c")
    if name is None or not os.path.exists("/proc/self/statm"):
        return None
    return cast("Callable[[int], int] | None", getattr(ctypes.CDLL(name), "malloc_trim", None))


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


async def memory_trimmer(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context that gives freed heap back to the system after a burst of bodies."""
    trim = _malloc_trim()
    task = asyncio.create_task(_trim_when_grown(trim)) if trim else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _trim_when_grown(trim: Callable[[int], int]) -> None:
    # The least the process has needed after a trim: while it sits well above that (during a
    # burst and once after it), freed pages are handed back every interval.
    floor = resident_bytes()
    while True:
        await asyncio.sleep(TRIM_INTERVAL_SECONDS)
        if resident_bytes() - floor > TRIM_GROWTH_BYTES:
            trim(0)
            resident = resident_bytes()
            floor = min(floor, resident)
            log.debug("heap trimmed: %d MiB resident", resident >> 20)
