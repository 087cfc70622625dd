"""The documentation stands alone: what a user who clones the repository reads (README.md, docs/, benchmark/README.md,
results/**/*.md and the notebook's text) links only to files the repository has, and to headings they have; no path
leaves the repository; and nothing refers to a design document outside it (the maths is docs/kl-contract.md's)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted(
    {
        REPO / "README.md",
        REPO / "benchmark" / "README.md",
        *(REPO / "docs").rglob("*.md"),
        *(REPO / "results").rglob("*.md"),
        *(REPO / "notebooks").glob("*.ipynb"),
    }
)
# Absolute paths a document may name (system locations every machine has); any other absolute path is the path of
# one machine's checkout or home, which a clone does not have.
SYSTEM_ROOTS = {"tmp", "proc", "dev", "usr", "etc", "sys", "bin", "opt", "var"}
OUTSIDE = re.compile(r"\.\./shared|shared/RESEARCH|RESEARCH\.md")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def text_of(doc: Path, raw: str | None = None) -> str:
    """The document's prose (of ``raw`` when given, else of the file): markdown without fenced code blocks; a
    notebook's markdown cells."""
    raw = doc.read_text() if raw is None else raw
    if doc.suffix == ".ipynb":
        raw = "\n\n".join("".join(c["source"]) for c in json.loads(raw)["cells"] if c["cell_type"] == "markdown")
    return FENCE.sub("", raw)


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(text_of(doc)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def inside(path: Path) -> bool:
    return path.resolve().is_relative_to(REPO)


def link_problems(doc: Path, raw: str | None = None) -> list[str]:
    """What is wrong with each link of ``doc`` (relative to the document, as GitHub resolves them)."""
    text = text_of(doc, raw)
    problems = []
    for target in LINK.findall(text) + REFERENCE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http(s)://, mailto: ...: not a file
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path) if path else doc
        if OUTSIDE.search(target) or path.startswith("/") or not inside(dest):
            problems.append(f"{target}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: {dest.relative_to(REPO)} has no heading #{anchor}")
    return problems


def path_problems(doc: Path, raw: str | None = None) -> list[str]:
    """Paths named in inline code that leave the repository: the old design document, a ../ that climbs out of it,
    an absolute path into one machine's files."""
    problems = []
    for _, span in CODE.findall(text_of(doc, raw)):
        if OUTSIDE.search(span):
            problems.append(f"`{span}`: names a document outside the repository")
            continue
        for token in re.split(r"[\s,;+]+", span):
            token = token.strip("()[]{}'\"")
            if token.startswith("/") and len(token) > 1 and token.split("/")[1] not in SYSTEM_ROOTS:
                problems.append(f"`{span}`: {token} is an absolute path, not one in the repository")
            elif token.startswith("../") and not inside(doc.parent / token):
                problems.append(f"`{span}`: {token} leaves the repository")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_paths_stay_in_the_repository(doc):
    problems = link_problems(doc) + path_problems(doc)
    assert not problems, f"{doc.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_checks_see_what_they_look_for():
    """Each kind of bad link and path is caught, on a made-up text for a document in docs/."""
    doc = REPO / "docs" / "kl-contract.md"
    bad = (
        "[maths](../../shared/RESEARCH.md) [up](../../x.md) [gone](no-such-file.md) [heading](sweeps.md#no-such) "
        "[fine](sweeps.md#the-experiment) [web](https://arxiv.org/abs/1909.08593) `/work/main/results/x` `/tmp/y` "
        "`../../outside` `../results/` `RESEARCH.md §2`\n\n```\n[in code](nowhere.md)\n```\n"
    )
    links, paths = link_problems(doc, bad), path_problems(doc, bad)
    assert links == [
        "../../shared/RESEARCH.md: leaves the repository",
        "../../x.md: leaves the repository",
        "no-such-file.md: no such file in the repository",
        "sweeps.md#no-such: docs/sweeps.md has no heading #no-such",
    ]
    assert paths == [
        "`/work/main/results/x`: /work/main/results/x is an absolute path, not one in the repository",
        "`../../outside`: ../../outside leaves the repository",
        "`RESEARCH.md §2`: names a document outside the repository",
    ]


def test_no_file_refers_to_the_design_document_outside_the_repository():
    """RESEARCH.md (and ../shared) lived outside the repository: a clone has neither. The maths is
    docs/kl-contract.md's and the experiment's design docs/sweeps.md's; every tracked text file cites them instead."""
    pattern = r"RESEARCH\.md|\.\./shared"
    try:
        out = subprocess.run(
            ["git", "grep", "-I", "-c", "-E", pattern, "--", ".", ":!tests/test_docs.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("git is not installed: the tracked files are unknown")
    if out.returncode not in (0, 1):  # 1: no match
        pytest.skip(f"not a git checkout ({out.stderr.strip()}): the tracked files are unknown")
    counts = {f: int(n) for f, _, n in (line.rpartition(":") for line in out.stdout.splitlines())}
    over = {f: n for f, n in counts.items() if n > 0}
    assert not over, f"they refer to RESEARCH.md or ../shared (cite docs/kl-contract.md or docs/sweeps.md): {over}"
