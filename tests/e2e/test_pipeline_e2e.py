"""`callstream run` as a user runs it: real processes, real broker, real receivers.

Oracle: one posted report gives one row, one notification per channel and one count in the
business metrics; posting it again changes none of them; the logs carry no phone number,
transcript, recording link or secret.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.support.pipeline import SECRET, Pipeline, Receivers, metric, rows, send_sample, until


async def test_run_pipeline_stores_alerts_and_counts_a_report_once(
    pipeline: Pipeline, receivers: Receivers
) -> None:
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            url = f"http://127.0.0.1:{pipeline.ingress_port}/readyz"
            async with session.get(url) as resp:
                return resp.status == 200

        await until(ready, what="ingress ready")
        sent = await asyncio.to_thread(send_sample, pipeline)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("202 ")

        async def stored() -> bool:
            return len(await asyncio.to_thread(rows, pipeline.db)) == 1

        await until(stored, what="the row")

        async def notified() -> bool:
            return len(receivers.hooks) == 1 and len(receivers.mailbox.messages) == 1

        await until(notified, what="both notifications")

        calls = 'callstream_calls_total{assistant="other",outcome="success"}'

        async def counted() -> bool:
            return await metric(session, pipeline.metrics_port, calls) == 1.0

        await until(counted, what="the metric")

        # The same report again (Flireo retrying after a timeout, say): signed anew, so at
        # least a second later; the same signed request again would be a replay, answered
        # without publishing.
        await asyncio.sleep(1.1)
        again = await asyncio.to_thread(send_sample, pipeline)
        assert again.returncode == 0, again.stderr

        async def seen_twice() -> bool:
            value = await metric(
                session,
                pipeline.metrics_port,
                'callstream_consumer_records_handled_total{consumer="metrics"}',
            )
            return value == 2.0

        await until(seen_twice, what="the duplicate to be handled")
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(rows, pipeline.db) == [
            ("cc1abf4a-d005-44a8-825f-702334e8d4c8", "+31623731537")
        ]
        assert len(receivers.hooks) == 1
        assert len(receivers.mailbox.messages) == 1
        assert await metric(session, pipeline.metrics_port, calls) == 1.0

    pipeline.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(pipeline.process.wait, 40) == 0

    # Privacy: nothing personal or secret reached the logs of any process.
    logs = pipeline.log.read_text()
    assert "starting callstream-ingress" in logs or "ingress listening" in logs
    for secret in (
        "+31623731537",
        "Gebruiker: Hallo Julia",
        "EXAMPLE_TOKEN",
        SECRET,
        "hook-secret-e2e",
    ):
        assert secret not in logs, secret
    mail = receivers.mailbox.messages[0].as_string()
    assert "+31623731537" not in mail
    assert "EXAMPLE_TOKEN" not in mail
