"""Citations in code and docs point at things a reader of the repository can open: the team's private specs
(ALGORITHMS.md, STYLE.md, ROUTING.md, PLACEMENT.md, SERVING.md, DATA.md) are not in it, so nothing may cite them (cite
the paper, or docs/conventions.md), and every docs/*.md a file names must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRIVATE = re.compile(r"\b(ALGORITHMS|STYLE|ROUTING|PLACEMENT|SERVING|DATA)\.md\b")


def _sources():
    for folder in ("moekit", "benchmarks", "scripts", "tests", "docs"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md") and p != Path(__file__))
    yield ROOT / "README.md"


def test_no_citation_of_specs_outside_the_repository():
    cited = [f"{p.relative_to(ROOT)}:{n}" for p in _sources() for n, line in enumerate(p.read_text().splitlines(), 1)
             if PRIVATE.search(line)]
    assert not cited, f"cite the paper or docs/conventions.md instead: {cited}"


def test_cited_docs_exist():
    missing = {m for p in _sources() for m in re.findall(r"docs/[\w-]+\.md", p.read_text())
               if not (ROOT / m).is_file()}
    assert not missing, missing
