"""The docs as a newcomer relies on them: the repository is self-contained (nothing points at a file outside it),
every page and heading a file cites exists, every path and command the docs name exists in the tree, and the
docs' lists of losses, params sections and stages are the code's, so they cannot go stale by hand."""

from __future__ import annotations

import re
import subprocess
from functools import cache, lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
THIS_FILE = Path(__file__).relative_to(ROOT).as_posix()
# Pointers to documents that live outside the repository (a spec's numbered sections, its files, a sibling folder).
OUTSIDE = [
    (re.compile(r"\bspec(?: section| sections)? \d+(?:\.\d+)*", re.IGNORECASE),
     "a numbered section of an outside spec"),
    (re.compile(r"\b(?:the spec|spec's)\b", re.IGNORECASE), "an outside spec"),
    (re.compile(r"ALGORITHMS\.md"), "the outside ALGORITHMS.md"),
    (re.compile(r"DESIGN\.md"), "the outside DESIGN.md"),
    (re.compile(r"\.\./shared\b"), "a folder beside the repository"),
]
DOC_CITATION = re.compile(r"\bdocs/[\w./-]*?\.md(?:#[\w-]+)?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
README_SECTION = re.compile(r"""README \\?["']([^"'\\]+)""")
PATH_MENTION = re.compile(r"`((?:tokenbridge|bench|tests|infra|docs)/[\w./-]*)")
NAMED_DEFINITION = re.compile(r"`((?:tokenbridge|bench|tests)/[\w/]+\.py): (\w+)")
# A command as written in backticks or a code block:
# `tokenbridge X`, `python -m tokenbridge X`, .venv/bin/tokenbridge X.
COMMAND_MENTION = re.compile(r"(?:`|-m |/bin/|^\s*)tokenbridge ([a-z_]+)")
FENCE = re.compile(r"^\s*(```|~~~)")


@lru_cache(maxsize=1)
def tracked_text_files() -> list[str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for name in names:
        path = ROOT / name
        if name == THIS_FILE or not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (plots)
        out.append(name)
    return out


def doc_pages() -> list[str]:
    """The maintained Markdown pages; `docs/results/` holds dated records, kept as they were written."""
    return [name for name in tracked_text_files()
            if name.endswith(".md") and not name.startswith("docs/results/")]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, '_' and '-' kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(page: str) -> frozenset[str]:
    """Every heading anchor of a Markdown file, repeated headings numbered as GitHub does; code blocks skipped."""
    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in (ROOT / page).read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not in_code:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def missing_target(page: str, anchor: str | None) -> str | None:
    """Why `page#anchor` (a path from the repository root) does not resolve, or None when it does."""
    if not (ROOT / page).exists():
        return f"{page} does not exist"
    if anchor and (ROOT / page).is_dir():
        return f"{page} is a folder, it has no heading #{anchor}"
    if anchor and anchor not in anchors(page):
        return f"{page} has no heading with anchor #{anchor} (has: {', '.join(sorted(anchors(page)))})"
    return None


def lines_of(name: str) -> list[tuple[int, str]]:
    return list(enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), start=1))


def test_no_tracked_file_points_outside_the_repository():
    problems = [f"{name}:{number}: {why}: {match.group(0)!r}"
                for name in tracked_text_files() for number, line in lines_of(name)
                for pattern, why in OUTSIDE for match in pattern.finditer(line)]
    assert not problems, ("cite the page under docs/ instead (docs/algorithms/ restates the methods):\n"
                          + "\n".join(problems))


def test_every_cited_docs_page_and_heading_exists():
    problems = []
    for name in tracked_text_files():
        for number, line in lines_of(name):
            for match in DOC_CITATION.finditer(line):
                page, _, anchor = match.group(0).partition("#")
                if why := missing_target(page, anchor or None):
                    problems.append(f"{name}:{number}: {match.group(0)}: {why}")
    assert not problems, "\n".join(problems)


def test_every_relative_markdown_link_resolves_to_a_file_and_heading():
    problems = []
    for name in doc_pages():
        for number, line in lines_of(name):
            for target in MARKDOWN_LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # http(s), mailto
                path, _, anchor = target.partition("#")
                page = (Path(name).parent / path).as_posix() if path else name
                page = Path(page).as_posix()
                resolved = (ROOT / page).resolve()
                if ROOT.resolve() not in resolved.parents and resolved != ROOT.resolve():
                    problems.append(f"{name}:{number}: {target}: leaves the repository")
                    continue
                if why := missing_target(resolved.relative_to(ROOT.resolve()).as_posix(), anchor or None):
                    problems.append(f"{name}:{number}: {target}: {why}")
    assert not problems, "\n".join(problems)


def test_every_readme_section_a_file_names_is_a_heading_of_the_readme():
    problems = [f"{name}:{number}: README {match.group(1)!r}"
                for name in tracked_text_files() if not name.startswith("docs/results/")
                for number, line in lines_of(name) for match in README_SECTION.finditer(line)
                if slug(match.group(1)) not in anchors("README.md")]
    assert not problems, "these README sections moved under docs/; cite the page:\n" + "\n".join(problems)


def test_every_path_the_docs_name_exists_in_the_tree():
    problems = []
    for name in doc_pages():
        for number, line in lines_of(name):
            for match in PATH_MENTION.finditer(line):
                path = match.group(1).rstrip(".")
                following = line[match.end():match.end() + 1]
                if following in "<{*" and following or "YYYY" in path:
                    continue  # a pattern (`docs/results/gpu-YYYY-MM-DD`, `loss-comparison-<profile>.md`), not a path
                if not (ROOT / path).exists():
                    problems.append(f"{name}:{number}: {path}")
    assert not problems, "paths named in the docs that the tree does not have:\n" + "\n".join(problems)


def test_every_function_the_docs_name_in_a_module_is_defined_there():
    problems = [f"{name}:{number}: {match.group(1)}: {match.group(2)}"
                for name in doc_pages() for number, line in lines_of(name)
                for match in NAMED_DEFINITION.finditer(line)
                if not re.search(rf"^\s*(?:def|class) {match.group(2)}\b", (ROOT / match.group(1)).read_text(), re.M)]
    assert not problems, "functions or classes the docs name that their module does not define:\n" + "\n".join(problems)


def test_every_tokenbridge_command_the_docs_name_is_a_cli_flow():
    from tokenbridge.cli import FLOWS

    problems = [f"{name}:{number}: tokenbridge {match.group(1)}"
                for name in doc_pages() for number, line in lines_of(name)
                for match in COMMAND_MENTION.finditer(line)
                if match.group(1) not in FLOWS]
    assert not problems, f"not a flow of tokenbridge/cli.py ({', '.join(FLOWS)}):\n" + "\n".join(problems)


def first_column(page: str, header: str) -> list[str]:
    """The backticked names in the first column of the Markdown table whose header row starts with `header`."""
    names: list[str] = []
    rows = iter((ROOT / page).read_text(encoding="utf-8").splitlines())
    for line in rows:
        if line.startswith(f"| {header} |"):
            next(rows)  # the |---| row
            for row in rows:
                if not row.startswith("|"):
                    break
                names += re.findall(r"`([^`]+)`", row.split("|")[1])
            return names
    raise AssertionError(f"{page} has no table whose first column is {header!r}")


def test_the_loss_table_names_exactly_the_registered_losses():
    from tokenbridge.losses import registry  # noqa: F401  (importing it registers every loss)
    from tokenbridge.losses.base import LOSSES

    documented = [name.split(" ")[0] for name in first_column("docs/losses.md", "`distill.loss`")]
    assert sorted(documented) == sorted(LOSSES), "docs/losses.md's table and the loss registry disagree"


def test_the_params_table_names_exactly_the_sections_of_params_yaml():
    sections = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert sorted(first_column("docs/parameters.md", "section")) == sorted(sections)


@pytest.mark.parametrize("page", ["README.md", "docs/stages.md"])
def test_every_dvc_stage_has_its_row_and_heading(page):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = [f"{name}@<model>" if "foreach" in stage else name for name, stage in stages.items()]
    if page == "README.md":
        assert sorted(first_column(page, "stage")) == sorted(names)
    else:
        assert {slug(f"`{name}`") for name in names} <= anchors(page)
