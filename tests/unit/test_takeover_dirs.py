"""Which spool directories a process looks at for records nobody owns (ingress/takeover.py),
and each worker's own directory (ingress/workers.py)."""

from __future__ import annotations

from pathlib import Path

from core.kafkasettings import KafkaSettings
from ingress.settings import IngressSettings
from ingress.spoolformat import MAGIC, segment_name
from ingress.takeover import holds_records, siblings, worker_dir
from ingress.workers import worker_settings


def test_a_worker_looks_at_the_single_process_layout_and_at_every_other_worker(
    tmp_path: Path,
) -> None:
    for index in (0, 1, 5):
        worker_dir(tmp_path, index).mkdir()
    (tmp_path / "worker-notes").mkdir()  # not a worker's
    assert siblings(worker_dir(tmp_path, 1)) == [
        tmp_path,
        worker_dir(tmp_path, 0),
        worker_dir(tmp_path, 5),
    ]


def test_a_single_process_looks_at_the_workers_under_its_own_directory(tmp_path: Path) -> None:
    worker_dir(tmp_path, 0).mkdir()
    worker_dir(tmp_path, 1).mkdir()
    assert siblings(tmp_path) == [worker_dir(tmp_path, 0), worker_dir(tmp_path, 1)]
    assert siblings(tmp_path / "absent") == []


def test_only_a_segment_with_more_than_its_header_holds_records(tmp_path: Path) -> None:
    (tmp_path / "cursor").write_bytes(b"")
    assert not holds_records(tmp_path)
    (tmp_path / segment_name(3)).write_bytes(MAGIC)
    assert not holds_records(tmp_path)
    (tmp_path / segment_name(4)).write_bytes(MAGIC + b"\0" * 20)
    assert holds_records(tmp_path)


def test_each_worker_spools_under_the_configured_directory() -> None:
    settings = IngressSettings(kafka=KafkaSettings("127.0.0.1:9"), spool_dir=Path("/s"), workers=4)
    worker = worker_settings(settings, 2)
    assert (worker.spool_dir, worker.worker_count) == (Path("/s/worker-2"), 1)
    assert worker_settings(IngressSettings(kafka=settings.kafka), 2).spool_dir is None
