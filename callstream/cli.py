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

import aiohttp
import orjson
from aiokafka.errors import KafkaConnectionError, KafkaError

from callstream import alerts, kafkacommand, rejected, soak
from callstream.bench.chart import redraw
from callstream.bench.options import BenchOptions
from callstream.bench.options import add_arguments as add_bench_arguments
from callstream.bench.run import run_bench
from callstream.clihelp import HelpFormatter, command, dash_values, examples, version
from callstream.commandsettings import LogSettings
from callstream.consumerstatus import consumers_command, registered_consumers
from callstream.dlq import list_command, redrive_command
from callstream.envexample import render as render_env_example
from callstream.envfile import with_env_file
from callstream.erase import erase, parse_age, purge
from callstream.localkafka import LocalKafka, default_home, ensure_broker
from callstream.processes import callstream_argv
from callstream.replay import ReplayRequest, replay_command
from callstream.sender import post_report
from callstream.supervisor import run_pipeline
from callstream.tail import tail
from callstream.trace import DEFAULT_LOOKBACK, trace_command
from consumers.catalog import lookup
from consumers.errors import ConsumerRegistryError, PermanentError, RetryableError
from consumers.service import run_consumer
from consumers.storage import StorageSettings, sha256_hex
from core import logs
from core.kafkadiagnosis import KafkaUnreachable, explain_now
from core.kafkasettings import BOOTSTRAP, KafkaSettings, rejected_topic_of
from core.settings import SettingsError, field_from_env
from core.signing import WEBHOOK_PATH
from ingress.server import WorkerLink, serve
from ingress.settings import IngressSettings
from ingress.workers import run_workers, worker_settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(dash_values(sys.argv[1:] if argv is None else argv))
    env: Mapping[str, str] = os.environ
    try:
        if args.command == "run":
            env = with_env_file(env)
        logs.configure(LogSettings.from_env(env).level, service=f"callstream-{args.command}")
        return int(args.func(args, env))
    except SettingsError as exc:
        # A configuration mistake is the operator's to fix: say what, without a traceback.
        return _fail(args, f"configuration error: {exc}")
    except ConsumerRegistryError as exc:
        return _fail(args, str(exc))
    except (KafkaUnreachable, KafkaConnectionError) as exc:
        return _fail(args, f"cannot use Kafka: {exc}")
    except aiohttp.ClientConnectionError as exc:  # an OSError too: before that one
        return _fail(args, f"cannot connect: {exc}")
    except BrokenPipeError:
        # The reader went away (`| head`): what it wanted it has. Python would complain
        # again when flushing stdout at exit, so stdout points nowhere from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FileNotFoundError as exc:
        return _fail(args, f"no such file: {exc.filename}")
    except OSError as exc:
        return _fail(args, f"{exc.filename or 'cannot'}: {exc.strerror or exc}")
    except SystemExit as exc:
        # Deeper layers stop with a sentence (`raise SystemExit("no broker: ...")`).
        if isinstance(exc.code, str):
            return _fail(args, exc.code)
        raise
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, message: str) -> int:
    """One line on stderr and exit code 2, as argparse does for a bad command line."""
    line = "; ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    print(f"callstream {args.command}: {line}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callstream",
        description="The callstream command: the pipeline's services (run, ingress, consumer)"
        " and the operator's tools. Settings come from the environment (.env.example lists"
        " them).",
        epilog=examples(
            "callstream run                      # the whole pipeline on this machine",
            "callstream consumers                # every consumer, its lag and origin",
            "callstream replay --consumer storage --from -2h --dry-run",
            "callstream SUBCOMMAND --help        # each subcommand's options and examples",
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    run = command(
        sub,
        "run",
        "the whole pipeline: local broker if needed, ingress, consumers",
        "callstream run                      # ./.env is read first when there is one",
        "callstream run --no-consumers       # only the ingress, e.g. to fill the topic",
        "KAFKA_BOOTSTRAP_SERVERS=kafka:9092 callstream run",
        description="The ingress and every registered consumer (built-in or from an installed"
        " package) as child processes, restarted when they die. Without"
        " KAFKA_BOOTSTRAP_SERVERS a local broker is started. A .env file in the working"
        " directory is read first; variables already set in the environment win over it.",
    )
    run.add_argument("--no-consumers", action="store_true", help="start only the ingress")
    run.set_defaults(func=_cmd_run)

    kafkacommand.add_parser(sub)

    ingress = command(
        sub,
        "ingress",
        "the webhook ingress service",
        "callstream ingress",
        "CALLSTREAM_INGRESS_PORT=8080 CALLSTREAM_WEBHOOK_SECRET=... callstream ingress",
    )
    # How the ingress starts its own workers (CALLSTREAM_INGRESS_WORKERS): not for people.
    ingress.add_argument("--worker", type=int, metavar="INDEX", help=argparse.SUPPRESS)
    ingress.set_defaults(func=_cmd_ingress)

    consumer = command(
        sub,
        "consumer",
        "run one consumer service",
        "callstream consumer storage",
        "callstream consumer crm-forward     # one an installed package registered",
    )
    consumer.add_argument("name", help="a registered consumer (see `callstream consumers`)")
    consumer.set_defaults(func=_cmd_consumer)

    send = command(
        sub,
        "send",
        "sign and post a report file to the ingress",
        "callstream send report.json --fresh-id",
        f"callstream send report.json --gzip --url https://ingress.example.com{WEBHOOK_PATH}",
    )
    send.add_argument("file", type=Path, help="a JSON report, as Flireo sends it")
    send.add_argument(
        "--url", help=f"default: http://127.0.0.1:$CALLSTREAM_INGRESS_PORT{WEBHOOK_PATH}"
    )
    send.add_argument("--gzip", action="store_true", help="send the body gzip-compressed")
    send.add_argument("--fresh-id", action="store_true", help="give the report a new call id")
    send.set_defaults(func=_cmd_send)

    tail = command(
        sub,
        "tail",
        "print decoded events from a topic as JSON lines",
        "callstream tail --max 10",
        "callstream tail --follow --from-end | jq .record.call_id",
    )
    tail.add_argument("--topic", help="default: $CALLSTREAM_TOPIC")
    tail.add_argument("--follow", "-f", action="store_true", help="keep waiting for new records")
    tail.add_argument("--max", type=int, default=None, help="stop after this many records")
    tail.add_argument("--from-end", action="store_true", help="only records arriving from now on")
    tail.set_defaults(func=_cmd_tail)

    consumers = command(
        sub,
        "consumers",
        "registered consumers: origin, group, state, members and lag",
        "callstream consumers",
        "callstream consumers --json | jq -r 'select(.lag > 0) | .name'",
        description="Every consumer callstream can run: the built-in ones and those installed"
        " packages register under the `callstream.consumers` entry point (ORIGIN: the"
        " package and its version), with their group's state, members and lag.",
    )
    consumers.add_argument(
        "--json", action="store_true", help="one JSON line per consumer, for machines"
    )
    consumers.set_defaults(func=_cmd_consumers)

    trace = command(
        sub,
        "trace",
        "follow one call through the pipeline: ingress, Kafka, consumers, storage, alerts",
        "callstream trace 7b1e2c94-3f0a-4d6b-9a51-0c2d8e4f6a13",
        "callstream trace --request-id 01HF3K2M --json | jq .storage",
        description="Follow one call through the pipeline: ingress, spool, Kafka, each consumer"
        " group, storage, status updates, alerts, dead letters, the quarantine, erasures. Reads"
        " only the last --lookback records of the call's partition of each topic. Exit code 0:"
        " found; 1: nothing names the call. See docs/operations.md#tracing-a-call.",
    )
    which_call = trace.add_mutually_exclusive_group(required=True)
    which_call.add_argument("call_id", nargs="?", metavar="CALL_ID", help="the call's id")
    which_call.add_argument(
        "--request-id", metavar="ID", help="the ingress request (X-Request-Id) instead"
    )
    trace.add_argument(
        "--lookback",
        type=int,
        default=DEFAULT_LOOKBACK,
        metavar="N",
        help="records per partition to read back from each topic's end"
        f" (default {DEFAULT_LOOKBACK}), e.g. --lookback 100000",
    )
    trace.add_argument("--json", action="store_true", help="one JSON document, e.g. `| jq .alerts`")
    trace.set_defaults(func=_cmd_trace)

    replay = command(
        sub,
        "replay",
        "re-handle a time range through one consumer, or re-publish it from storage",
        "callstream replay --consumer storage --from -2h --dry-run",
        "callstream replay --consumer alerting --from 2025-09-01T09:00Z --to 2025-09-02",
        "callstream replay --restore replay-callstream-storage-20250901T100000Z.offsets.json",
        "callstream replay --from-storage --from -7d",
        description="Times are ISO-8601, UTC unless a zone is given, or back from now: -7d,"
        " -2h, -30m. Without --to, the group's offsets move and the ones replaced are saved"
        " to a file that --restore puts back. See docs/replay.md.",
    )
    source = replay.add_mutually_exclusive_group(required=True)
    source.add_argument("--consumer", metavar="NAME", help="replay through this consumer's group")
    source.add_argument(
        "--from-storage",
        action="store_true",
        help="re-publish stored reports (by event time) onto the topic",
    )
    source.add_argument(
        "--restore",
        metavar="FILE",
        type=Path,
        help="put a group's offsets back from the file an earlier replay saved",
    )
    replay.add_argument(
        "--from", dest="since", metavar="TIME", help="start of the range: 2025-09-01, -2h"
    )
    replay.add_argument(
        "--to",
        dest="until",
        metavar="TIME",
        help="end of the range, exclusive (without it, --consumer only moves the group)",
    )
    replay.add_argument(
        "--offsets-file",
        metavar="FILE",
        type=Path,
        help="where to save the offsets replaced (default: replay-GROUP-TIME.offsets.json)",
    )
    replay.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    replay.set_defaults(func=_cmd_replay)

    dlq = command(
        sub,
        "dlq",
        "the dead-letter topic: list it, re-drive a consumer's records (docs/operations.md)",
        "callstream dlq list",
        "callstream dlq redrive --consumer storage --dry-run",
    )
    dlq_actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = command(
        dlq_actions,
        "list",
        "dead letters per consumer and error type, and how many wait for a re-drive",
        "callstream dlq list --consumer alerting",
        "callstream dlq list --json | jq -r .error",
    )
    dlq_list.add_argument("--consumer", metavar="NAME", help="only this consumer's")
    dlq_list.add_argument(
        "--json", action="store_true", help="one JSON line per dead letter, with its error"
    )
    dlq_list.set_defaults(func=_cmd_dlq_list)
    redrive = command(
        dlq_actions,
        "redrive",
        "put a consumer's dead letters back on their topic, for that consumer only",
        "callstream dlq redrive --consumer storage --dry-run",
        "callstream dlq redrive --consumer storage",
    )
    redrive.add_argument(
        "--consumer", metavar="NAME", required=True, help="the consumer whose records to re-drive"
    )
    redrive.add_argument("--dry-run", action="store_true", help="count them, send nothing")
    redrive.set_defaults(func=_cmd_dlq_redrive)

    alerts_cmd = command(
        sub,
        "alerts",
        "alerts the alerting consumer sent or gave up on; send the given-up ones again",
        "callstream alerts list --failed --since -2h",
        "callstream alerts retry --dry-run",
        description="Alerts the alerting consumer sent or gave up on. Run with the alerting "
        "consumer's settings (CALLSTREAM_ALERT_STATE_PATH, CALLSTREAM_ALERT_RULES); see "
        "docs/operations.md#failed-alerts.",
    )
    alerts_actions = alerts_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    alerts_list = command(
        alerts_actions,
        "list",
        "every alert: rule, channel, call, status, error, attempts, times",
        "callstream alerts list --failed",
        "callstream alerts list --since -7d --json | jq -r .error",
    )
    alerts_list.add_argument("--failed", action="store_true", help="only alerts given up on")
    alerts_list.add_argument(
        "--since",
        metavar="TIME",
        help="changed since an ISO time or an age back from now: 2026-12-01T09:00Z, -2h, -7d",
    )
    alerts_list.add_argument("--json", action="store_true", help="one JSON object per line")
    alerts_list.set_defaults(func=alerts.list_command)
    alerts_retry = command(
        alerts_actions,
        "retry",
        "send given-up alerts again, once each, with the same alert_id",
        "callstream alerts retry --dry-run",
        "callstream alerts retry --id 3",
        description="Send given-up alerts again, once each, with the same alert_id. Without "
        "--id or --since: every alert given up on and not yet resent.",
    )
    which = alerts_retry.add_mutually_exclusive_group()
    which.add_argument(
        "--id", type=int, metavar="ID", help="one dead letter, as `alerts list` numbers it: --id 3"
    )
    which.add_argument(
        "--since",
        metavar="TIME",
        help="given up since an ISO time or an age back from now: 2026-12-01T09:00Z, -2h, -7d",
    )
    alerts_retry.add_argument(
        "--dry-run", action="store_true", help="show what would be sent, send nothing"
    )
    alerts_retry.set_defaults(func=alerts.retry_command)

    rejected.add_parser(sub).set_defaults(func=_cmd_rejected)

    bench = command(
        sub,
        "bench",
        "measure throughput, latency and cost on this machine (docs/performance.md)",
        "callstream bench --quick            # check the bench itself works",
        "callstream bench --phases ingress,catch-up",
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    soak_run = sub.add_parser(
        "soak",
        help="steady load through the real processes while faults are injected (not a test)",
        description=soak.__doc__,
        epilog=examples("callstream soak --minutes 10", "callstream soak --minutes 60 --seed 7"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    soak.add_arguments(soak_run)
    soak_run.set_defaults(func=_cmd_soak)

    erase = command(
        sub,
        "erase",
        "delete a person's reports from storage and record it (docs/privacy.md)",
        "callstream erase --phone +31612345678",
        "callstream erase --call 0b9c3f52-6c1e-4c55-9d2b-2f3a1f6e8a11",
        description="Both options: only calls matching both. The Kafka topic keeps its copy "
        "until its retention passes; see docs/privacy.md.",
    )
    erase.add_argument("--phone", metavar="NUMBER", help="the caller's number, as stored (+316...)")
    erase.add_argument("--call", metavar="ID", help="one call id")
    erase.set_defaults(func=_cmd_erase)

    purge = command(
        sub,
        "purge",
        "delete stored reports older than an age, for retention (docs/privacy.md)",
        "callstream purge --older-than 30d",
    )
    purge.add_argument(
        "--older-than", metavar="AGE", required=True, help="by event time: 30d, 12h, 90m, 2w"
    )
    purge.set_defaults(func=_cmd_purge)

    settings = command(
        sub,
        "settings",
        "the environment variables callstream reads",
        "callstream settings --env-example > .env",
    )
    settings.add_argument(
        "--env-example",
        action="store_true",
        required=True,
        help="print .env.example as the settings declarations make it",
    )
    settings.set_defaults(func=_cmd_settings)
    return parser


def _cmd_settings(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    sys.stdout.write(render_env_example())
    return 0


def kafka_settings(env: Mapping[str, str], *, start_local: bool) -> KafkaSettings:
    """KAFKA_BOOTSTRAP_SERVERS if set; otherwise the local broker (started when asked)."""
    bootstrap = None
    if not BOOTSTRAP.is_set(env):
        if start_local:
            bootstrap = ensure_broker(default_home())
        else:
            status = LocalKafka(default_home()).status()
            if status is None or not status.running:
                raise SystemExit(
                    "no broker: set KAFKA_BOOTSTRAP_SERVERS, or run `callstream kafka start`"
                )
            bootstrap = status.bootstrap
    local = {} if bootstrap is None else {"bootstrap_servers": bootstrap}
    kafka = KafkaSettings.from_env(env, **local)
    if kafka.security.protocol != "PLAINTEXT":
        # A rejected password or an untrusted certificate never heals by retrying: say so
        # now, in one line, rather than in a retry loop's log.
        reason = explain_now(kafka.bootstrap_servers, kafka.security)
        if reason is not None:
            raise KafkaUnreachable(reason)
    return kafka


def _cmd_ingress(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = IngressSettings.from_env(env, kafka=kafka_settings(env, start_local=False))
    if args.worker is not None:
        link = WorkerLink.from_env(env)
        _run_async(serve(worker_settings(settings, args.worker), worker=link))
        return 0
    if settings.worker_count == 1:
        _run_async(serve(settings))
        return 0
    # The workers use the broker this process found, without looking again.
    child_env = dict(env) | {BOOTSTRAP.env: settings.kafka.bootstrap_servers}
    return run_workers(
        settings.worker_count,
        lambda index: callstream_argv("ingress", "--worker", str(index)),
        child_env,
    )


def _cmd_consumer(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    lookup(args.name)  # an unknown name is told before any broker is looked for
    return _run_async(run_consumer(args.name, env, kafka_settings(env, start_local=False)))


def _cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    kafka = kafka_settings(env, start_local=True)
    child_env = dict(env) | {BOOTSTRAP.env: kafka.bootstrap_servers}
    return run_pipeline(child_env, with_consumers=not args.no_consumers)


def _cmd_send(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    body = args.file.read_bytes()
    if args.fresh_id:
        body = _with_fresh_call_id(body)
    # The ingress's own declarations: `send` posts where and how the ingress listens.
    port = field_from_env(IngressSettings, "port", env)
    url = args.url or f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    secrets = field_from_env(IngressSettings, "webhook_secrets", env)
    tokens = field_from_env(IngressSettings, "shared_tokens", env)
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


def _cmd_consumers(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    watched = registered_consumers()  # a name clash is told before any broker is looked for
    kafka = kafka_settings(env, start_local=False)
    return _run_async(consumers_command(kafka, sys.stdout, as_json=args.json, consumers=watched))


def _cmd_trace(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.lookback < 1:
        return _fail(args, "--lookback must be at least 1")
    kafka = kafka_settings(env, start_local=False)
    return _run_async(
        trace_command(
            kafka,
            env,
            sys.stdout,
            call_id=args.call_id,
            request_id=args.request_id,
            lookback=args.lookback,
            as_json=args.json,
        )
    )


def _cmd_replay(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.restore is None and args.since is None:
        raise SystemExit("--from TIME is required with --consumer and --from-storage")
    request = ReplayRequest(
        args.consumer,
        args.since,
        args.until,
        args.dry_run,
        args.from_storage,
        restore=args.restore,
        offsets_file=args.offsets_file,
    )
    return _run_async(replay_command(request, env, kafka_settings(env, start_local=False)))


def _cmd_dlq_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    kafka = kafka_settings(env, start_local=False)
    return _run_async(list_command(kafka, sys.stdout, consumer=args.consumer, as_json=args.json))


def _cmd_dlq_redrive(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    kafka = kafka_settings(env, start_local=False)
    return _run_async(
        redrive_command(kafka, args.consumer, sys.stdout, sys.stderr, dry_run=args.dry_run)
    )


def _cmd_rejected(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    kafka = kafka_settings(env, start_local=False)
    if args.action == "list":
        return _run_async(
            rejected.list_command(
                kafka, sys.stdout, since=args.since, reason=args.reason, as_json=args.json
            )
        )
    if args.action == "show":
        return _run_async(rejected.show_command(kafka, args.request_id, sys.stdout, sys.stderr))
    return _run_async(
        rejected.reprocess_command(
            kafka,
            sys.stdout,
            request_id=args.request_id,
            since=args.since,
            dry_run=args.dry_run,
            limits=rejected.Limits.from_env(env),
        )
    )


def _cmd_bench(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.chart is not None:
        return redraw(args.chart, args.chart_out, sys.stdout, sys.stderr)
    return _run_async(run_bench(BenchOptions.from_args(args)))


def _cmd_soak(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    return asyncio.run(soak.soak(soak.options_from(args)))


def _cmd_erase(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    # Stripped once here, so storage and the quarantine are searched for the same text.
    phone, call_id = (None if value is None else value.strip() for value in (args.phone, args.call))
    # Outside the try: a bad setting is main's configuration error, not a refused selector.
    settings = StorageSettings.from_env(env)
    try:
        outcome = _run_async(erase(settings, phone=phone, call_id=call_id))
    except ValueError as exc:
        print(f"callstream erase: {exc}", file=sys.stderr)
        return 2
    except (RetryableError, PermanentError) as exc:
        print(f"callstream erase: nothing erased: {exc}", file=sys.stderr)
        return 1
    # The number is not echoed: terminals and CI logs keep scrollback.
    selectors = [
        f"{name} sha256 {sha256_hex(value)[:12]}..."
        for name, value in (("phone", phone), ("call", call_id))
        if value
    ]
    print(
        f"erased {outcome.rows} stored row(s), reports and status updates"
        f" ({', '.join(selectors)}); erasure #{outcome.entry}"
    )
    if outcome.rows == 0 and phone:
        print("no match: numbers are matched exactly as stored, e.g. +31612345678", file=sys.stderr)
    _warn_about_kafka(env, outcome.compacted)
    return _erase_quarantine(env, phone, call_id)


def _erase_quarantine(env: Mapping[str, str], phone: str | None, call_id: str | None) -> int:
    """Refused requests kept in the quarantine hold the same numbers: they go too."""
    topic = rejected_topic_of(field_from_env(KafkaSettings, "topic", env))
    if not BOOTSTRAP.is_set(env):
        local = LocalKafka(default_home()).status()
        if local is None or not local.running:
            print(
                f"note: the quarantine ({topic}) was not searched: no Kafka here; run again with "
                f"{BOOTSTRAP.env} set to erase its entries too",
                file=sys.stderr,
            )
            return 0
    kafka = kafka_settings(env, start_local=False)
    try:
        tombstoned = _run_async(rejected.erase_matching(kafka, phone=phone, call_id=call_id))
    except KafkaError as exc:
        print(f"callstream erase: storage erased, the quarantine not: {exc}", file=sys.stderr)
        return 1
    print(f"erased {tombstoned} quarantined request(s) from {topic}")
    return 0


def _cmd_purge(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        age = parse_age(args.older_than)
    except ValueError as exc:
        return _fail(args, f"--older-than: {exc}")
    try:
        outcome = _run_async(purge(StorageSettings.from_env(env), age))
    except (RetryableError, PermanentError) as exc:
        print(f"callstream purge: nothing purged: {exc}", file=sys.stderr)
        return 1
    print(
        f"purged {outcome.rows} stored row(s), reports and status updates,"
        f" older than {args.older_than}; erasure #{outcome.entry}"
    )
    _warn_about_kafka(env, outcome.compacted)
    return 0


def _warn_about_kafka(env: Mapping[str, str], compacted: bool) -> None:
    topic = field_from_env(KafkaSettings, "topic", env)
    if not compacted:
        print(
            "the database was busy: deleted, but not yet compacted; run again later",
            file=sys.stderr,
        )
    print(
        f"note: Kafka topics {topic} and {topic}.dlq keep their copies until their retention "
        "(CALLSTREAM_TOPIC_RETENTION_MS) passes; storage will not take erased calls back, "
        "but other consumers of the topic see them again on a replay (docs/privacy.md)",
        file=sys.stderr,
    )


T = TypeVar("T")


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        # uvloop has no Windows build (pyproject installs it only elsewhere): optional here.
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
