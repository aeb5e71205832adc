"""The documentation against the code: every `laionfilter …` command in README.md and docs/ names real
commands and options, the CLI reference is current, and relative links (and their anchors) resolve."""

import re
import shlex
import sys
from pathlib import Path

import click
import pytest

from laionfilter.cli import cli

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "CHANGELOG.md",
         *sorted((ROOT / "docs").glob("*.md"))]
# The research log keeps past commands as they were; the CLI reference is checked whole below.
USER_PAGES = [p for p in PAGES if p.name not in ("research-log.md", "cli.md")]


def _code(text: str) -> list[str]:
    """Command lines in fenced blocks (continuation lines joined) and in inline code spans."""
    lines, fenced = [], re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in fenced:
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return lines


def commands(page: Path) -> list[list[str]]:
    found = []
    for line in _code(page.read_text()):
        for m in re.finditer(r"(?:^|[\s(=])laionfilter ((?:--?|[a-z])[^#|]*)", line):
            try:
                found.append(shlex.split(m.group(1)))
            except ValueError:  # an unbalanced quote: the line is prose that mentions the tool
                continue
    return found


def check(tokens: list[str]) -> str | None:
    """None, or what is wrong with one command line."""
    cmd, path = cli, []
    while tokens and isinstance(cmd, click.Group) and tokens[0] in cmd.commands:
        path.append(tokens[0])
        cmd = cmd.commands[tokens.pop(0)]
    if isinstance(cmd, click.Group) and tokens and not tokens[0].startswith("-"):
        return f"laionfilter {' '.join(path)}: no command {tokens[0]!r}"
    # hidden options are old spellings, kept for a release: the docs use the current ones
    known = {o for p in cmd.params if not getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)}
    known |= {"--help", "-h"}
    for t in tokens:
        if t.startswith("-") and len(t) > 1 and not t[1].isdigit():
            name = t.split("=", 1)[0]
            if name not in known:
                return f"laionfilter {' '.join(path)}: no option {name}"
    return None


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_in_the_docs_is_real(page):
    found = commands(page)
    problems = [f"{problem}  (in: {' '.join(t)})" for t in found if (problem := check(list(t)))]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should():
    assert check(["score", "x", "--profile", "p", "--out", "o"]) is None
    assert check(["bank", "import", "a.pth", "--base", "b", "--out", "o"]) is None
    assert "no option --colour" in check(["score", "x", "--colour"])
    assert "no option --profile" in check(["select", "scores/", "--profile", "alice"])  # the old spelling
    assert "no command 'nonsense'" in check(["bank", "nonsense"])
    page = ROOT / "README.md"
    assert len(commands(page)) >= 10  # the README's commands are found at all


def test_the_cli_reference_is_current():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from make_cli_reference import render
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run: python docs/make_cli_reference.py"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, broken
