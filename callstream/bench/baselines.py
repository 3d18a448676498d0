"""The two servers the ingress is measured against, run on the same machine in the same run.

* ``bare``: an aiohttp handler that reads the body and answers 202. Nothing a webhook
  receiver could do costs less on this stack: the HTTP ceiling.
* ``naive``: what a user would write first: check the signature, ``json.loads``, then
  ``send_and_wait`` on an aiokafka producer per request with acks=all and the client's
  default batching (no linger, 16 kB batches, no compression); the JSON goes on the topic
  as it came.

Both run the way the ingress runs (uvloop, no access log), so a ratio between them and
the ingress measures the application code, not the server setup. Each counts the
requests it accepted at GET /bench-count, which the bench samples once a second.

Run as ``python -m callstream.bench.baselines bare|naive --port P [...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator

from aiohttp import web
from aiokafka import AIOKafkaProducer

from core.settings import field_from_env
from core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_PATH, verify
from ingress.settings import IngressSettings

ACCEPTED = web.AppKey("accepted", list[int])


async def _count(request: web.Request) -> web.Response:
    return web.Response(text=str(request.app[ACCEPTED][0]))


def bare_app() -> web.Application:
    app = web.Application(client_max_size=2_000_000)
    app[ACCEPTED] = [0]

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        request.app[ACCEPTED][0] += 1
        return web.Response(status=202)

    app.router.add_post(WEBHOOK_PATH, receive)
    app.router.add_get("/bench-count", _count)
    return app


def naive_app(bootstrap: str, topic: str, secret: bytes) -> web.Application:
    app = web.Application(client_max_size=2_000_000)
    app[ACCEPTED] = [0]
    producers: list[AIOKafkaProducer] = []

    async def kafka(app: web.Application) -> AsyncIterator[None]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        producers.append(producer)
        yield
        await producer.stop()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers.get(TIMESTAMP_HEADER, "")
        if not verify(body, timestamp, request.headers.get(SIGNATURE_HEADER, ""), (secret,)):
            return web.json_response({"error": "bad signature"}, status=401)
        report = json.loads(body)
        await producers[0].send_and_wait(topic, body, key=str(report["callId"]).encode())
        request.app[ACCEPTED][0] += 1
        return web.json_response({"status": "accepted", "callId": report["callId"]}, status=202)

    app.cleanup_ctx.append(kafka)
    app.router.add_post(WEBHOOK_PATH, receive)
    app.router.add_get("/bench-count", _count)
    return app


async def _serve(app: web.Application, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m callstream.bench.baselines")
    parser.add_argument("kind", choices=["bare", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", help="naive: Kafka bootstrap servers")
    parser.add_argument("--topic", default="bench.naive")
    args = parser.parse_args(argv)
    if args.kind == "bare":
        app = bare_app()
    else:
        secrets = field_from_env(IngressSettings, "webhook_secrets", os.environ)
        if not args.bootstrap or not secrets:
            parser.error("naive needs --bootstrap and CALLSTREAM_WEBHOOK_SECRET")
        app = naive_app(args.bootstrap, args.topic, secrets[0].reveal().encode())
    # uvloop: imported here as everywhere in callstream, being optional off Linux.
    import uvloop

    uvloop.run(_serve(app, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
