"""The docs the code cites exist: every `docs/REFERENCE.md §N` names a section of it, and nothing cites a file
outside the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("omni_fast", "kernels", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py")]


def test_every_cited_section_of_the_reference_exists():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "REFERENCE.md").read_text(), re.M))
    cited = {(p.relative_to(ROOT), n) for p in SOURCES for cite in re.findall(r"docs/REFERENCE\.md ((?:§\d+(?:, )?)+)",
                                                                          p.read_text()) for n in re.findall(r"\d+", cite)}
    assert cited, "no docstring cites docs/REFERENCE.md"
    assert not [c for c in cited if c[1] not in sections], sections


def test_nothing_cites_notes_outside_the_repository():
    assert not [str(p.relative_to(ROOT)) for p in SOURCES if p != Path(__file__) and "research/r1omni" in p.read_text()]
