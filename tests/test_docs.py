"""The project documents itself: README within its size, every link into docs/ resolves
(file and heading), no file cites a design document the repository does not hold, and the
README's test command is the one CI runs."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", md.read_text(), re.M)}


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_is_short_and_docs_exist():
    assert (REPO / "README.md").stat().st_size <= 15_000
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    for page in ("design.md", "encoder.md", "sdxl.md", "flux.md", "data.md", "evaluation.md",
                 "conversion.md", "scale.md", "performance.md"):
        assert page in pages


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(md):
    for target in LINK.findall(md.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        assert dest.exists(), f"{md.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{md.name}: no heading #{anchor} in {dest.name}"


def test_no_file_cites_a_missing_design_document():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    citing = [f for f in files if (REPO / f).is_file() and f != "tests/test_docs.py"
              and "DESIGN.md" in (REPO / f).read_text(errors="ignore")]
    assert citing == []
    assert (REPO / "docs" / "design.md").is_file()


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert command in readme
