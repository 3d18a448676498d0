"""The documented example consumer, attached the documented way, against the real broker.

Copy this file as the template for testing a consumer of your own.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from consumers import catalog
from consumers.contract import ConsumerSpec
from consumers.runner import RunnerSettings
from consumers.service import run_consumer
from core.kafkasettings import KafkaSettings
from examples import crm_forward
from tests.support.produce import produce_reports, sample_report


async def test_example_crm_consumer_forwards_every_report_once(
    kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[dict[str, object]] = []
    failures_left = 1

    async def crm(request: web.Request) -> web.Response:
        nonlocal failures_left
        if failures_left:
            failures_left -= 1
            return web.Response(status=503)  # a CRM hiccup: the runner must retry
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_put("/calls", crm)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    # The one catalog line the docs ask for.
    monkeypatch.setitem(
        catalog.CONSUMERS,
        "crm-forward",
        ConsumerSpec(crm_forward.build, 0, "summaries to the CRM"),
    )
    ids = await produce_reports(kafka, [sample_report() for _ in range(3)])
    stop = asyncio.Event()
    env = {
        "CALLSTREAM_CRM_URL": f"http://127.0.0.1:{port}/calls",
        "CALLSTREAM_CRM_FORWARD_PORT": "0",
    }
    settings = RunnerSettings(
        group_id="callstream-crm-forward-test", topic=kafka.topic, retry_initial_seconds=0.05
    )
    service = asyncio.create_task(
        run_consumer("crm-forward", env, kafka, stop=stop, runner_settings=settings)
    )
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(received) < 3:
            assert asyncio.get_running_loop().time() < deadline, received
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        assert await asyncio.wait_for(service, 30) == 0
        await runner.cleanup()
    assert sorted(str(r["externalId"]) for r in received) == sorted(ids)
    assert {r["candidateId"] for r in received} == {"cand_123456"}
