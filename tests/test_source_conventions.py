"""Comments speak of the code, read from the source (nothing is imported): a citation of upstream line numbers names
the upstream commit it was read at (`@bd9f465`, docs/architecture.md "Citing upstream"), and no comment speaks of
how the project was developed (the machines it was developed on, its working sessions)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
UPSTREAM_AT = "@bd9f465"
SOURCES = sorted([*(ROOT / "llavaction_jax").rglob("*.py"), *(ROOT / "configs").glob("*.py"),
                  *(ROOT / "tests").glob("*.py"), *(p for p in (ROOT / "launch").iterdir() if p.is_file())])
LINE_CITATION = re.compile(r"\b\w+\.py:\d+(?:-\d+)?\b|\blines \d+-\d+\b")
DEVELOPMENT = re.compile(r"\bthe (?:GPU|TPU|device) machine\b|\b(?:GPU|machine) lent\b|\blent (?:GPU|machine)\b"
                         r"|\bthis session\b", re.IGNORECASE)


def _lines():
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield f"{path.relative_to(ROOT)}:{number}: {line.strip()}", line


def test_upstream_line_citations_name_the_commit():
    assert len(SOURCES) > 100
    missing = [where for where, line in _lines()
               if (m := LINE_CITATION.search(line)) and UPSTREAM_AT not in line[m.end():]]
    assert not missing, "line-number citations without the upstream commit:\n" + "\n".join(missing)


def test_comments_speak_of_the_code():
    this = pathlib.Path(__file__).name
    found = [where for where, line in _lines() if DEVELOPMENT.search(line) and not where.startswith(f"tests/{this}")]
    assert not found, "comments about how the project was developed:\n" + "\n".join(found)
