"""A topic missing from the metadata is named once a minute, as a warning, not an error a
second: on a fresh broker it is the normal gap between one service creating a topic and
another seeing it."""

from __future__ import annotations

import logging

from core.logs import MissingTopic


def not_found(topic: str) -> logging.LogRecord:
    """The record aiokafka's cluster metadata logs for a topic it does not find."""
    return logging.LogRecord(
        MissingTopic.LOGGER, logging.ERROR, __file__, 1, MissingTopic.MESSAGE, (topic,), None
    )


def test_the_first_miss_of_a_topic_is_one_warning_naming_it() -> None:
    missing = MissingTopic()
    first = not_found("flireo.events")
    assert missing.filter(first)
    assert first.levelname == "WARNING"
    assert first.getMessage() == (
        "topic flireo.events is not in the cluster's metadata (yet): waiting for it to be created"
    )
    assert not any(missing.filter(not_found("flireo.events")) for _ in range(20))


def test_each_topic_is_named_on_its_own() -> None:
    missing = MissingTopic()
    assert missing.filter(not_found("a"))
    assert missing.filter(not_found("b"))
    assert not missing.filter(not_found("a"))


def test_a_topic_that_never_appears_is_named_again_after_the_quiet_time() -> None:
    missing = MissingTopic(quiet=0.0)
    assert missing.filter(not_found("a"))
    assert missing.filter(not_found("a"))


def test_other_aiokafka_records_pass_unchanged() -> None:
    record = logging.LogRecord(
        MissingTopic.LOGGER, logging.ERROR, __file__, 1, "Topic %s is not authorized", ("a",), None
    )
    assert MissingTopic().filter(record)
    assert record.levelname == "ERROR"
