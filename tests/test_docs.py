"""The documentation that ships with the repository: every relative link resolves, and nothing points outside it.

Links are checked as GitHub renders them: a relative path must exist, and a ``#fragment`` into a Markdown file
must be one of that file's heading anchors (GitHub's slug: lower case, punctuation dropped, spaces to hyphens).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
#: Files the pointer check scans: the docs, the benchmark reports and scripts, the notebooks.
SCANNED = DOC_FILES + sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "notebooks").glob("*.ipynb"),
                              *(ROOT / "gim_tl").rglob("*.py"),
                              *(p for p in (ROOT / "tests").glob("*.py") if p.name != "test_docs.py")])
#: Pointers to material a user of the repository does not have.
OUTSIDE = re.compile(r"shared/|gim_spec|spec §")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_slug_matches_github():
    assert slug("5. Presets and the paper's ablation names") == "5-presets-and-the-papers-ablation-names"
    assert slug("Norms: `hook_scale` is real on HookedTransformer, a side value") == (
        "norms-hook_scale-is-real-on-hookedtransformer-a-side-value")


def test_docs_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"README.md", "gim.md", "evaluation.md", "transformerlens.md"} <= names


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    text = CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointer_outside_the_repository(path: Path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, f"{path.relative_to(ROOT)} points outside the repository:\n" + "\n".join(hits)
