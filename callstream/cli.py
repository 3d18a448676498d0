"""The `callstream` command: one entry point for every service and tool.

Settings are read from the environment here, once, and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import sys
import time
import uuid
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson

from callstream import logs
from callstream.envparse import SettingsError
from callstream.kafkaconfig import KafkaSettings
from callstream.secret import secrets_from


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    env = os.environ
    logs.configure(env.get("CALLSTREAM_LOG_LEVEL", "INFO"), service=f"callstream-{args.command}")
    try:
        return int(args.func(args, env))
    except SettingsError as exc:
        # A configuration mistake is the operator's to fix: say what, without a traceback.
        print(f"callstream {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="the whole pipeline: local broker if needed, ingress, consumers"
    )
    run.add_argument("--no-consumers", action="store_true", help="start only the ingress")
    run.set_defaults(func=_cmd_run)

    kafka = sub.add_parser("kafka", help="the local single-node KRaft broker")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.set_defaults(func=_cmd_kafka)

    ingress = sub.add_parser("ingress", help="the webhook ingress service")
    ingress.set_defaults(func=_cmd_ingress)

    consumer = sub.add_parser("consumer", help="run one consumer service")
    consumer.add_argument("name", help="a registered consumer (see `callstream consumers`)")
    consumer.set_defaults(func=_cmd_consumer)

    send = sub.add_parser("send", help="sign and post a report file to the ingress")
    send.add_argument("file", type=Path)
    send.add_argument(
        "--url", help="default: http://127.0.0.1:$CALLSTREAM_INGRESS_PORT/webhooks/flireo"
    )
    send.add_argument("--gzip", action="store_true", help="send the body gzip-compressed")
    send.add_argument("--fresh-id", action="store_true", help="give the report a new call id")
    send.set_defaults(func=_cmd_send)

    tail = sub.add_parser("tail", help="print decoded events from a topic as JSON lines")
    tail.add_argument("--topic", help="default: $CALLSTREAM_TOPIC")
    tail.add_argument("--follow", "-f", action="store_true", help="keep waiting for new records")
    tail.add_argument("--max", type=int, default=None, help="stop after this many records")
    tail.add_argument("--from-end", action="store_true", help="only records arriving from now on")
    tail.set_defaults(func=_cmd_tail)
    return parser


def kafka_settings(env: Mapping[str, str], *, start_local: bool) -> KafkaSettings:
    """KAFKA_BOOTSTRAP_SERVERS if set; otherwise the local broker (started when asked)."""
    bootstrap = None
    if not env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        from callstream.localkafka import LocalKafka, default_home, ensure_broker

        if start_local:
            bootstrap = ensure_broker(default_home())
        else:
            status = LocalKafka(default_home()).status()
            if status is None or not status.running:
                raise SystemExit(
                    "no broker: set KAFKA_BOOTSTRAP_SERVERS, or run `callstream kafka start`"
                )
            bootstrap = status.bootstrap
    return KafkaSettings.from_env(env, bootstrap_servers=bootstrap)


def _cmd_kafka(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from callstream.localkafka import LocalKafka, default_home

    broker = LocalKafka(default_home())
    if args.action == "start":
        print(broker.start())
    elif args.action == "stop":
        broker.stop()
        print("stopped")
    else:
        status = broker.status()
        if status is None or not status.running:
            print("not running")
            return 1
        print(f"running pid={status.pid} bootstrap={status.bootstrap} data={status.data_dir}")
    return 0


def _cmd_ingress(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ingress.server import serve
    from ingress.settings import IngressSettings

    settings = IngressSettings.from_env(env, kafka=kafka_settings(env, start_local=False))
    _run_async(serve(settings))
    return 0


def _cmd_consumer(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from consumers.service import run_consumer

    return _run_async(run_consumer(args.name, env, kafka_settings(env, start_local=False)))


def _cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from callstream.supervisor import run_pipeline

    kafka = kafka_settings(env, start_local=True)
    child_env = dict(env) | {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers}
    return run_pipeline(child_env, with_consumers=not args.no_consumers)


def _cmd_send(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from callstream.sender import post_report

    body = args.file.read_bytes()
    if args.fresh_id:
        body = _with_fresh_call_id(body)
    port = env.get("CALLSTREAM_INGRESS_PORT", "8080")
    url = args.url or f"http://127.0.0.1:{port}/webhooks/flireo"
    secrets = secrets_from(env.get("CALLSTREAM_WEBHOOK_SECRET"))
    tokens = secrets_from(env.get("CALLSTREAM_SHARED_TOKEN"))
    status, text = _run_async(
        post_report(
            url,
            gzip.compress(body) if args.gzip else body,
            secret=secrets[0] if secrets else None,
            token=tokens[0] if tokens and not secrets else None,
            gzipped=args.gzip,
        )
    )
    print(status, text)
    return 0 if 200 <= status < 300 else 1


def _with_fresh_call_id(body: bytes) -> bytes:
    payload: dict[str, Any] = orjson.loads(body)
    new_id = str(uuid.uuid4())
    if isinstance(payload.get("message"), dict):
        payload["message"].setdefault("call", {})["id"] = new_id
    else:
        payload["callId"] = new_id
        payload["eventTimestamp"] = int(time.time() * 1000)
    return orjson.dumps(payload)


def _cmd_tail(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from callstream.tail import tail

    kafka = kafka_settings(env, start_local=False)
    return _run_async(
        tail(
            kafka,
            args.topic or kafka.topic,
            follow=args.follow,
            limit=args.max,
            from_beginning=not args.from_end,
            out=sys.stdout,
        )
    )


T = TypeVar("T")


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
