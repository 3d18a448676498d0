"""README's "Writing your own consumer" cannot drift: its listings are the example package's
files, and its CallReport table names every field of schemas/report.py with its type."""

from __future__ import annotations

import dataclasses
import re

from schemas.report import CallReport
from tests.support.paths import REPO

README = (REPO / "README.md").read_text()
SECTION = README.split("### Writing your own consumer", 1)[1].split("\n## ", 1)[0]
EXAMPLE = REPO / "examples" / "crm-forward"


def listings(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", SECTION, flags=re.DOTALL | re.MULTILINE)


def test_readme_shows_the_example_consumer_module_whole() -> None:
    assert listings("python") == [(EXAMPLE / "crm_forward.py").read_text()]


def test_readme_shows_the_example_package_entry_point_whole() -> None:
    assert listings("toml") == [(EXAMPLE / "pyproject.toml").read_text()]


def test_readme_table_names_every_call_report_field_with_its_type() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `(.+?)` \|", SECTION, flags=re.MULTILINE)
    documented = [(name, kind.replace("\\|", "|")) for name, kind in rows]
    declared = [(f.name, str(f.type)) for f in dataclasses.fields(CallReport)]
    assert documented == declared
