"""Every documentation citation in the repository points at a file and a section that exist.

The code, configs, CLI help, README and tests cite the docs as ``docs/algorithms.md §3e`` or
``docs/architecture.md §4``; a bare ``docs/<file>.md`` names a page, and a Markdown link ``[text](path)`` names a
file. These tests scan ``lightning_sparse/``, ``examples/``, ``benchmarks/``, ``tests/``, ``README.md`` and ``docs/``
and fail on a citation whose file or section does not exist. A section exists when the cited page has a Markdown
heading that starts with it (``## §3e Cyclic sparsity``, ``#### §2d.7 Two definitions of sparsity``, or the numbered
form ``## 2. The kernel``).

They also fail on any citation of the design notes that are not part of the repository (the upper-case
``ARCHITECTURE.md``, ``ALGORITHMS.md``, ``ECOSYSTEM.md``) or of a path outside it (``../shared``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("lightning_sparse", "examples", "benchmarks", "tests", "docs")
SCANNED_FILES = ("README.md",)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".rst"}
SKIPPED_DIR_NAMES = {"__pycache__", ".pytest_cache", ".ruff_cache", "lightning_logs", "checkpoints"}

_SECTION = r"[0-9A-Za-z]+(?:\.[0-9A-Za-z]+)*"
# `<path>.md §<section>`, the section possibly on the next line of a comment or docstring, possibly followed by
# more sections of the same page (`§4b, §2b`, `§2d.2 and §4a`, `§2-§3`).
_CITATION = re.compile(
    r"(?<![\w/.-])(?P<path>(?:\.\./|[\w.-]+/)*[\w.-]+\.md)"
    r"(?P<gap>[ \t]*(?:\n[ \t]*(?:#|//|\*)?[ \t]*)?)"
    r"§(?P<first>" + _SECTION + r"|\S*)"
    r"(?P<more>(?:[ \t]*(?:,|and|-|–|&)[ \t]*§" + _SECTION + r")*)"
)
_MORE_SECTIONS = re.compile(r"§(" + _SECTION + r")")
_LEADING_SECTION = re.compile(r"^(" + _SECTION + r")")
_BARE_DOCS_PAGE = re.compile(r"(?<![\w/.-])(?P<path>docs/[\w./-]*?[\w-]+\.md)(?![\w])")
_MARKDOWN_LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?:#[^)\s]*)?\)")
# `## §3e Cyclic sparsity`, or the numbered form `## 2. The kernel`.
_HEADING_SECTION = re.compile(
    r"^ {0,3}#{1,6}[ \t]+(?:§(" + _SECTION + r")(?=[\s:;,.—–-]|$)|(" + _SECTION + r")\.(?=\s))", re.MULTILINE
)
_FORBIDDEN = re.compile(r"ARCHITECTURE\.md|ALGORITHMS\.md|ECOSYSTEM\.md|\.\./shared|shared/design|shared/seeds")


@dataclass(frozen=True)
class Citation:
    source: Path
    line: int
    path: str
    sections: tuple[str, ...]
    problem: str = ""

    def where(self, root: Path) -> str:
        return f"{self.source.relative_to(root)}:{self.line}"


def scanned_files(root: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """The text files whose citations are checked."""
    files = [root / name for name in SCANNED_FILES if (root / name).is_file()]
    for directory in SCANNED_DIRS:
        base = root / directory
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if (
                path.is_file()
                and path.suffix in TEXT_SUFFIXES
                and not SKIPPED_DIR_NAMES.intersection(path.relative_to(root).parts)
            ):
                files.append(path)
    skipped = {p.resolve() for p in skip}
    return [path for path in files if path.resolve() not in skipped]


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def find_citations(source: Path, text: str) -> list[Citation]:
    """The section citations, bare ``docs/*.md`` pages and Markdown link targets in one file."""
    citations: list[Citation] = []
    cited_spans: list[tuple[int, int]] = []
    for match in _CITATION.finditer(text):
        first = _LEADING_SECTION.match(match["first"])
        problem = "" if first else f"unreadable section '§{match['first']}'"
        sections = ((first.group(1),) if first else ()) + tuple(_MORE_SECTIONS.findall(match["more"]))
        citations.append(Citation(source, _line_of(text, match.start()), match["path"], sections, problem))
        cited_spans.append(match.span("path"))
    for match in _BARE_DOCS_PAGE.finditer(text):
        if match.span("path") not in cited_spans:
            citations.append(Citation(source, _line_of(text, match.start()), match["path"], ()))
    if source.suffix == ".md":
        for match in _MARKDOWN_LINK.finditer(text):
            target = match["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            citations.append(Citation(source, _line_of(text, match.start()), target, ()))
    # A page named twice on one line (a link whose target is also a bare docs/ path) is one citation.
    return list(dict.fromkeys(citations))


def page_sections(page: Path) -> set[str]:
    """The sections of a Markdown page: every heading that starts with ``§<section>`` or ``<section>.``."""
    return {marked or numbered for marked, numbered in _HEADING_SECTION.findall(page.read_text(encoding="utf-8"))}


def resolve(root: Path, source: Path, cited: str) -> Path | None:
    """The cited file, relative to the citing file's folder or to the repository root; ``None`` if neither."""
    for base in (source.parent, root):
        candidate = (base / cited).resolve()
        if candidate.is_file() and candidate.is_relative_to(root.resolve()):
            return candidate
    return None


def citation_problems(root: Path, skip: tuple[Path, ...] = ()) -> tuple[list[str], int]:
    """Every citation that names a missing file or section, and the number of citations checked."""
    problems: list[str] = []
    sections_by_page: dict[Path, set[str]] = {}
    checked = 0
    for source in scanned_files(root, skip):
        for citation in find_citations(source, source.read_text(encoding="utf-8")):
            checked += 1
            where = citation.where(root)
            if citation.problem:
                problems.append(f"{where}: {citation.path}: {citation.problem}")
                continue
            page = resolve(root, source, citation.path)
            if page is None:
                problems.append(f"{where}: {citation.path} does not exist")
                continue
            if not citation.sections:
                continue
            if page not in sections_by_page:
                sections_by_page[page] = page_sections(page) if page.suffix == ".md" else set()
            for section in citation.sections:
                if section not in sections_by_page[page]:
                    problems.append(f"{where}: {citation.path} has no section §{section}")
    return problems, checked


def forbidden_references(root: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    """Every mention of the design notes' upper-case names or of a path outside the repository."""
    found = []
    for source in scanned_files(root, skip):
        text = source.read_text(encoding="utf-8")
        for match in _FORBIDDEN.finditer(text):
            found.append(f"{source.relative_to(root)}:{_line_of(text, match.start())}: {match.group(0)}")
    return found


def _format(problems: list[str]) -> str:
    shown = "\n".join(problems[:60])
    more = f"\n... and {len(problems) - 60} more" if len(problems) > 60 else ""
    return f"{len(problems)} problem(s):\n{shown}{more}"


THIS_FILE = (Path(__file__).resolve(),)


def test_every_citation_names_an_existing_file_and_section() -> None:
    problems, checked = citation_problems(ROOT, skip=THIS_FILE)
    assert checked > 0, "the scan found no citation at all: the patterns or the scanned folders are wrong"
    assert not problems, _format(problems)


def test_nothing_cites_the_design_notes_or_paths_outside_the_repository() -> None:
    found = forbidden_references(ROOT, skip=THIS_FILE)
    assert not found, (
        "cite docs/architecture.md, docs/algorithms.md, docs/ecosystem.md (same section numbers) instead of the "
        "design notes or ../shared; " + _format(found)
    )


def test_the_code_cites_the_docs() -> None:
    # The docstrings cite the algorithm or design section they implement; a scan that finds only a handful of
    # citations into docs/ means the citations were lost (or the pattern broke), not that they all resolve.
    into_docs = [
        c
        for source in scanned_files(ROOT, skip=THIS_FILE)
        if source.relative_to(ROOT).parts[0] != "docs"
        for c in find_citations(source, source.read_text(encoding="utf-8"))
        if c.sections and c.path.startswith("docs/")
    ]
    assert len(into_docs) >= 100, f"only {len(into_docs)} section citations into docs/ outside docs/"
    for name in ("architecture", "algorithms", "troubleshooting", "distributed", "ecosystem", "index"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"


# ------------------------------------------------------------------------------ the scanner on a small tree
@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## §1 Start\n\n## §2 Methods\n\n### §2a First\n\n#### §2a.3 An item\n\nSee [the index](index.md).\n"
    )
    (tmp_path / "docs" / "index.md").write_text("# Index\n\n* [guide](guide.md#2-methods)\n* guide.md §2a\n")
    (tmp_path / "docs" / "numbered.md").write_text("# Numbered\n\n## 1. Use\n\n## 2. The kernel\n\nVersion 3 is out.\n")
    (tmp_path / "lightning_sparse").mkdir()
    return tmp_path


def _problems_for(root: Path, code: str) -> list[str]:
    (root / "lightning_sparse" / "mod.py").write_text(code)
    return citation_problems(root)[0]


def test_scanner_accepts_citations_that_resolve(tiny_repo: Path) -> None:
    code = (
        '"""Implements docs/guide.md §2a, §2a.3 and §1 (see docs/guide.md).\n\n'
        'Wrapped: (docs/guide.md\n    §2); a range docs/guide.md §1-§2.\n"""\n'
        "# a comment (docs/guide.md\n# §2a.3)\n"
        "# numbered headings count too: docs/numbered.md §2\n"
    )
    assert _problems_for(tiny_repo, code) == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("# docs/guide.md §3\n", "docs/guide.md has no section §3"),
        ("# docs/guide.md §2b\n", "docs/guide.md has no section §2b"),
        ("# docs/guide.md §2a.4\n", "docs/guide.md has no section §2a.4"),
        ("# docs/guide.md §2a, §2c\n", "docs/guide.md has no section §2c"),
        ("# (docs/guide.md\n#  §9)\n", "docs/guide.md has no section §9"),
        ("# docs/numbered.md §3\n", "docs/numbered.md has no section §3"),
        ("# docs/missing.md §1\n", "docs/missing.md does not exist"),
        ("# see docs/missing.md for more\n", "docs/missing.md does not exist"),
        ("# DESIGN.md §(c)9\n", "unreadable section"),
    ],
)
def test_scanner_reports_a_missing_file_or_section(tiny_repo: Path, code: str, expected: str) -> None:
    problems = _problems_for(tiny_repo, code)
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith("lightning_sparse/mod.py:")


def test_scanner_reports_a_broken_markdown_link(tiny_repo: Path) -> None:
    (tiny_repo / "README.md").write_text("Read [the docs](docs/index.md) and [the FAQ](docs/faq.md).\n")
    problems = citation_problems(tiny_repo)[0]
    assert problems == ["README.md:1: docs/faq.md does not exist"]


def test_scanner_reports_the_design_notes_and_shared_paths(tiny_repo: Path) -> None:
    (tiny_repo / "lightning_sparse" / "mod.py").write_text(
        "# ALGORITHMS.md §3e\n# ARCHITECTURE.md §4\n# ECOSYSTEM.md\n# ../shared/design/notes.md\n"
    )
    found = forbidden_references(tiny_repo)
    assert [entry.split(": ")[1] for entry in found] == [
        "ALGORITHMS.md",
        "ARCHITECTURE.md",
        "ECOSYSTEM.md",
        "../shared",
    ]
