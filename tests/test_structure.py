"""The package's shape: training code apart from the runtime, and no import circles."""

import ast
from pathlib import Path

import click

import laionfilter
from laionfilter.cli import cli

PACKAGE = Path(laionfilter.__file__).parent
RUNTIME = ["bank", "learn", "profile", "ratings", "evaluate", "score", "scorer", "mapper", "reader", "writer",
           "distribute", "query", "guidance", "export", "authors", "images", "model"]


def _imports(path: Path) -> set[str]:
    """laionfilter modules a module imports, at the top or inside functions (lazy imports count)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else []
            found.update([target] + names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("laionfilter"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("laionfilter"))
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and not m.endswith("__init__")} - {".".join(rel.parts)}


def _graph() -> dict[str, set[str]]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_runtime_imports_no_training_code():
    """Not even lazily: every import the runtime's modules could ever run, followed through the graph."""
    graph = _graph()
    assert "laionfilter.train.finetune" in graph["laionfilter.cli"]  # the walk sees lazy imports
    for m in RUNTIME:
        seen, stack = set(), [f"laionfilter.{m}"]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        assert not {x for x in seen if x.startswith("laionfilter.train")}, m


def test_no_import_circles():
    graph = _graph()
    assert "laionfilter.scorer" in graph["laionfilter.distribute"]  # the walk sees lazy imports

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles[0]


def test_the_readme_module_table_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("| module | holds |")[1].split("\n\n")[0]
    listed = {name.strip().strip("`/") for row in table.splitlines()[2:] for name in row.split("|")[1].split(",")}
    modules = {".".join(p.relative_to(PACKAGE).with_suffix("").parts).replace(".", "/")
               for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    assert modules - listed == set(), "modules missing from the README's module table"
    assert {m for m in listed if m != "web"} - modules == set(), "the README's module table names modules that do not exist"


def test_the_cli_offers_the_library_s_choices():
    # the CLI spells its choices out so that `laionfilter --help` need not import torch; they must not drift
    from laionfilter.calibrate import KINDS
    from laionfilter.learn import INITS
    learn = cli.commands["learn"]
    choices = {p.name: list(p.type.choices) for p in learn.params if isinstance(p.type, click.Choice)}
    assert choices["init"] == list(INITS)
    assert choices["calibration"] == [*KINDS, "none"]
