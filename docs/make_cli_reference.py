"""Writes docs/cli.md from the commands' own --help: `python docs/make_cli_reference.py`.

tests/test_docs.py checks that docs/cli.md is what this writes, so the reference never drifts."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.commands[name]
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def render() -> str:
    from laionfilter.cli import cli

    runner = CliRunner()
    parts = ["# Command-line reference", "",
             "Every command's `--help`, in the order of `laionfilter --help`. Made by "
             "`python docs/make_cli_reference.py`; a test checks that it is current.", ""]
    for path, _ in [((), cli), *_commands(cli)]:
        name = " ".join(("laionfilter", *path))
        text = runner.invoke(cli, [*path, "--help"], terminal_width=100, prog_name="laionfilter").output
        parts += [f"## {name}" if path else "## laionfilter", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    out = Path(__file__).with_name("cli.md")
    out.write_text(render())
    sys.stdout.write(f"{out}\n")
