"""`callstream trace`'s screen: the document callstream/trace.py collects, one section per
place the call can be, in the order a report travels through them."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def _unavailable(section: Json) -> str | None:
    return None if section.get("available", True) else f"  unavailable: {section['note']}"


def _lookback(doc: Json) -> list[str]:
    look = doc["lookback"]
    lines = [f"looked back: the last {look['records_per_partition']} record(s) per partition"]
    for w in look.get("windows", []):
        whole = ", the whole partition" if w["whole_partition"] else ""
        lines.append(
            f"  {w['topic']}[{w['partition']}] offsets {w['from_offset']}..{w['to_offset']}{whole}"
        )
    lines += [f"  {topic}: does not exist" for topic in look.get("missing_topics", [])]
    return lines


def _reception(r: Json) -> str:
    if r["durable"] == "spool":
        where = f"still in the spool (since {r['spooled_at']}), not yet on Kafka"
    else:
        via = " through the spool" if r["through_spool"] else ""
        after = r["published_after_seconds"]
        where = f"durable on Kafka{via}" + ("" if after is None else f" ({after} s later)")
    return (
        f"  request {r['request_id']}  {r['event_type']}  received {r['received_at']}"
        f"  format {r['source_format']}  {where}"
    )


def _version(v: Json) -> str:
    groups = ", ".join(f"{name} {g['state']}" for name, g in v["groups"].items())
    return (
        f"  {v['topic']}[{v['partition']}]@{v['offset']}  {v['event_type']}"
        f"  event time {v.get('event_time')}  request {v['request_id']}  {groups}"
    )


def _storage(doc: Json) -> list[str]:
    section = doc["storage"]
    lines = ["storage:"]
    if (off := _unavailable(section)) is not None:
        return [*lines, off]
    row = section["row"]
    if row is None:
        return [*lines, "  no row"]
    # Only what the report said: a flat report has no call status or ended reason.
    said = "".join(
        f"  {label} {row[key]}"
        for label, key in (("status", "call_status"), ("ended", "ended_reason"))
        if row[key] is not None
    )
    return [
        *lines,
        f"  stored {row['stored_at']} from {row['event_type']} of {row['event_time']}"
        f" (request {row['request_id']}, Kafka [{row['kafka_partition']}]@{row['kafka_offset']})"
        + said,
    ]


def _event(e: Json) -> str:
    error = f"  error {e['error']}" if e["error"] else ""
    return f"  {e['event_time']}  {e['status']}{error}  stored {e['stored_at']}"


def _alert(a: Json) -> str:
    error = f"  {a['error']}" if a["error"] else ""
    return (
        f"  {a['rule']} -> {a['channel']}: {a['status']} after {a['attempts']} attempt(s)"
        f" ({a['updated_at']}){error}"
    )


def _dead_letter(d: Json) -> str:
    redriven = "re-driven" if d["redriven"] else "not re-driven"
    return (
        f"  {d['consumer']} gave up {d['dead_lettered_at']} on {d['origin']['topic']}"
        f"[{d['origin']['partition']}]@{d['origin']['offset']}: {d['error']} ({redriven})"
    )


def _entries(
    title: str, section: Json, line: Any, key: str = "entries", none: str = "none"
) -> list[str]:
    lines = [f"{title}:"]
    if (off := _unavailable(section)) is not None:
        return [*lines, off]
    found = [line(entry) for entry in section.get(key, [])]
    return [*lines, *found] if found else [*lines, f"  {none}"]


def render_text(doc: Json) -> str:
    head = f"call {doc['call_id']}" if doc["call_id"] else "no call found"
    if doc["request_id"]:
        head += f" (request {doc['request_id']})"
    lines = [head, *_lookback(doc)]
    if doc["call_id"] is None:
        return "\n".join([*lines, "nothing names this request in the window or the spool"]) + "\n"
    lines += _entries("received by the ingress", doc, _reception, "receptions", "none found")
    lines += _entries("on Kafka", doc, _version, "versions", "none in the window")
    lines += _entries(
        "spool",
        doc["spool"],
        lambda s: f"  {s['event_type']} request {s['request_id']} spooled {s['spooled_at']}",
    )
    lines += _storage(doc)
    lines += _entries("status updates", doc["timeline"], _event, "events", "none stored")
    lines += _entries("alerts", doc["alerts"], _alert, "alerts")
    lines += _entries("dead letters", doc["dead_letters"], _dead_letter)
    lines += _entries(
        "quarantine",
        doc["quarantine"],
        lambda q: f"  request {q['request_id']}: {q['state']} {q['problem']}",
    )
    lines += _entries(
        "erasures",
        doc["erasures"],
        lambda e: (
            f"  #{e['id']} by {e['by']} requested {e['requested_at']}"
            f" completed {e['completed_at']} ({e['rows_deleted']} row(s))"
        ),
    )
    if not doc["found"]:
        lines.append("nothing names this call: not received, or older than the window")
    return "\n".join(lines) + "\n"
