"""What the recent-deliveries set costs per remembered delivery: it holds every 2xx answer for
the signature's tolerance, so at a few hundred reports a second it holds tens of thousands.

Found by the soak: the ingress's memory grew by about 5 kB per report accepted, because
each remembered 202 kept the 4 kB buffer orjson wrote its ~140-byte body into.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import uuid

import orjson
from aiohttp import web

from ingress.replays import RecentDeliveries

DELIVERIES = 2_000


async def test_a_remembered_delivery_costs_well_under_a_kilobyte() -> None:
    """Oracle: remembering 2,000 deliveries answered with a 202 body written by orjson, as the
    ingress writes it, takes under 1 kB each (key, entry and a body of ~140 bytes)."""
    recent = RecentDeliveries(window_seconds=300)

    async def accepted() -> web.Response:
        body = orjson.dumps(
            {
                "status": "accepted",
                "eventType": "end-of-call-report",
                "callId": str(uuid.uuid4()),
                "requestId": str(uuid.uuid4()),
                "topic": "flireo.end-of-call-report",
                "durable": "kafka",
            }
        )
        return web.Response(status=202, body=body, content_type="application/json")

    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(DELIVERIES):
            await recent.answer(f"{1_700_000_000 + i}:{uuid.uuid4().hex * 2}", accepted)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_delivery = (after - before) / DELIVERIES
    assert per_delivery < 1024, f"{per_delivery:.0f} bytes per remembered delivery"


async def test_expired_answers_are_forgotten_while_no_request_arrives() -> None:
    """Oracle: once the window has passed, the sweeper alone (no new request) empties the set,
    so the memory a burst of deliveries took is given back."""
    recent = RecentDeliveries(window_seconds=0.2, sweep_interval=0.05)

    async def accepted() -> web.Response:
        return web.Response(status=202, body=b"{}", content_type="application/json")

    sweeping = recent.sweeper(web.Application())
    await anext(sweeping)
    try:
        for n in range(50):
            await recent.answer(f"1700000000:{n:064x}", accepted)
        assert len(recent) == 50
        await asyncio.sleep(0.5)
        assert len(recent) == 0
    finally:
        await sweeping.aclose()
