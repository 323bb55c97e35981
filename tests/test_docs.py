"""The documentation resolves: every relative link of the top-level pages, benchmarks/README.md and
docs/ points to a file of the repository (and, with a #fragment, to a heading of that page), and
no file cites a document that is not in the repository (CONTRIBUTING.md, "Conventions")."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "CHANGELOG.md",
        ROOT / "benchmarks" / "README.md",
        ROOT / "aepg_kernels" / "train" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# Documents that live outside the repository, and references to the issue tracker instead of a doc.
# A quoted name ("llm.md") is an output file the harness writes, not a citation.
FOREIGN_CITATION = re.compile(
    r"(?<![\"'/])\b(?:method|kernels|llm|machines|style-review)\.md\b|shared/docs|\bissue \d+"
)
SCANNED_SUFFIXES = {".py", ".h", ".cu", ".cpp", ".sh", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}


def heading_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {heading_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(page: Path):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # skip https:, mailto:, ...
            yield target


def repository_files():
    """The files git tracks or would add (untracked, not ignored), relative to the root."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def test_the_documentation_pages_exist():
    for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "docs/math.md", "docs/design.md"):
        assert (ROOT / name).is_file(), f"{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved}")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_cited_docs_sections_exist():
    """A citation such as `docs/math.md section 6` in code names a numbered heading of that page."""
    cited = re.compile(r"docs/(\w+)\.md sections? (\d+)(?: and (\d+))?")
    missing = []
    for path in repository_files():
        if path.suffix not in SCANNED_SUFFIXES:
            continue
        for match in cited.finditer(path.read_text(encoding="utf-8", errors="replace")):
            page = ROOT / "docs" / f"{match.group(1)}.md"
            numbers = [n for n in match.groups()[1:] if n]
            headings = page.read_text(encoding="utf-8") if page.is_file() else ""
            for number in numbers:
                if not re.search(rf"^## {number}\. ", headings, re.MULTILINE):
                    missing.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not missing, "citations of sections that do not exist:\n" + "\n".join(missing)


def test_no_file_cites_a_document_outside_the_repository():
    offenders = []
    for path in repository_files():
        if path.suffix not in SCANNED_SUFFIXES or path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FOREIGN_CITATION.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "cite docs/ instead:\n" + "\n".join(offenders)
