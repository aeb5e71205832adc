import click
from click.testing import CliRunner

from laionfilter.cli import cli


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_every_command_is_documented_with_an_example():
    found = list(_commands(cli))
    names = {" ".join(path) for path, _ in found}
    assert {"learn", "score", "select", "query", "bank import", "bank info", "evaluate", "demo"} <= names
    for path, cmd in found:
        r = CliRunner().invoke(cli, [*path, "--help"])
        assert r.exit_code == 0, path
        assert cmd.help and "Example:" in cmd.help and "laionfilter " + " ".join(path) in cmd.help, path


def test_errors_are_one_line_without_traceback(tmp_path):
    r = CliRunner().invoke(cli, ["finetune", str(tmp_path / "none.csv"), "--base", "lf-tiny-vit", "--out", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 1
    assert r.output.strip().startswith("Error:") and "no such" in r.output and "Traceback" not in r.output


def test_the_command_list_is_in_workflow_order_with_whole_summaries():
    from laionfilter.cli import WORKFLOW

    r = CliRunner().invoke(cli, ["--help"])
    listed = [line.split()[0] for line in r.output.split("Commands:")[1].splitlines()
              if line.startswith("  ") and not line.startswith("    ")]
    assert listed == list(WORKFLOW) == [n for n in ("demo", "rate", "suggest", "learn", "inspect", "score", "report",
                                                    "select", "query", "guidance", "reshard", "fetch", "bank",
                                                    "finetune", "evaluate")]
    assert "..." not in r.output.split("Commands:")[1]  # no summary cut short


def test_every_command_that_reports_takes_json():
    reporting = ["learn", "inspect", "score", "report", "select", "guidance", "reshard", "evaluate",
                 ("bank", "info"), ("bank", "build"), ("bank", "import")]
    for name in reporting:
        path = name if isinstance(name, tuple) else (name,)
        cmd = cli
        for part in path:
            cmd = cmd.commands[part]
        assert "--json" in {o for p in cmd.params for o in p.opts}, path
