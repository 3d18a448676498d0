"""A signed request sent again within the signature's tolerance is the same delivery: it
gets the answer the first one got, and is not published a second time.

Anyone who saw a signed request can replay it for as long as its timestamp is accepted;
without this, every replay would be one more record for every consumer (storage absorbs
it, alerting and metrics would not). A genuine resend is signed anew, with a new
timestamp, and stays a new delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from core.signing import SIGNATURE_HEADER, SIGNATURE_PREFIX, TIMESTAMP_HEADER

# Bounds the memory a flood of distinct signed requests can take (a few hundred bytes each).
MAX_REMEMBERED = 100_000
# Expired answers are also dropped while no request arrives, so the memory a burst took is
# given back once its window has passed, not at the next request.
SWEEP_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type)


@dataclass(slots=True)
class _Seen:
    expires: float
    answer: asyncio.Future[Answer]


@contextlib.asynccontextmanager
async def sweeping(
    interval: float, sweep: Callable[[float], object], name: str
) -> AsyncIterator[None]:
    """Calls `sweep(time.monotonic())` every `interval` seconds while the block runs."""

    async def forever() -> None:
        while True:
            await asyncio.sleep(interval)
            sweep(time.monotonic())

    task = asyncio.create_task(forever(), name=f"{name}-sweep")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def delivery_key(headers: Mapping[str, str]) -> str | None:
    """What identifies one signed delivery: its timestamp and signature."""
    signature = headers.get(SIGNATURE_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    if not signature or not timestamp:
        return None
    return f"{timestamp.strip()}:{signature.strip().lower().removeprefix(SIGNATURE_PREFIX)}"


async def first_delivery(
    handle: Callable[[], Awaitable[web.Response]],
    keep: Callable[[Answer], object],
    drop: Callable[[], object],
) -> tuple[web.Response, bool]:
    """`handle`'s response, not a replay. Its answer is kept for replays if it is a 2xx, else
    dropped: a refused or failed request may be tried again as it was."""
    try:
        response = await handle()
    except BaseException:
        drop()
        raise
    body = response.body
    if 200 <= response.status < 300 and isinstance(body, bytes):
        # A copy of exactly its length: the body orjson wrote sits in a buffer of 4 kB, and
        # tens of thousands of answers are kept for the whole tolerance.
        keep(Answer(response.status, bytes(memoryview(body)), response.content_type))
    else:
        drop()
    return response, False


class RecentDeliveries:
    def __init__(
        self,
        window_seconds: float,
        max_remembered: int = MAX_REMEMBERED,
        sweep_interval: float = SWEEP_INTERVAL_SECONDS,
    ) -> None:
        self._window = window_seconds
        self._max = max_remembered
        self._sweep_interval = sweep_interval
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    async def sweeper(self, app: web.Application) -> AsyncGenerator[None, None]:
        """A cleanup context: forgets expired answers on a timer while the app runs."""
        async with sweeping(self._sweep_interval, self._forget_expired, "recent-deliveries"):
            yield

    async def answer(
        self, key: str, handle: Callable[[], Awaitable[web.Response]]
    ) -> tuple[web.Response, bool]:
        """The response for this delivery, and whether it is a replay of an earlier one.

        A replay that arrives while the first is still being handled waits for it."""
        now = time.monotonic()
        self._forget_expired(now)
        seen = self._seen.get(key)
        if seen is not None:
            # Waiting does not consume the answer: other replays may wait on it too.
            await asyncio.wait({seen.answer})
            # Cancelled: the first was not accepted, so this one is handled on its own.
            if not seen.answer.cancelled():
                return seen.answer.result().response(), True
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._seen[key] = _Seen(now + self._window, answer)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return await first_delivery(handle, answer.set_result, lambda: self._drop(key, answer))

    def _drop(self, key: str, answer: asyncio.Future[Answer]) -> None:
        answer.cancel()
        current = self._seen.get(key)
        if current is not None and current.answer is answer:
            del self._seen[key]

    def _forget_expired(self, now: float) -> None:
        while self._seen:
            key, oldest = next(iter(self._seen.items()))
            if oldest.expires > now:
                return
            del self._seen[key]
