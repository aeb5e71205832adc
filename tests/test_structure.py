"""The package's shape: training code apart from the runtime, and no import circles."""

import ast
from pathlib import Path


import laionfilter
from laionfilter.cli import cli

PACKAGE = Path(laionfilter.__file__).parent
RUNTIME = ["bank", "learn", "profile", "ratings", "evaluate", "score", "scorer", "mapper", "reader", "writer",
           "distribute", "query", "guidance", "export", "authors", "images", "model", "report", "shards", "jobs"]


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


def test_the_architecture_page_lists_every_module():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = page.split("| module | holds |")[1].split("\n\n")[0]
    listed = {name.strip().strip("`/") for row in table.splitlines()[2:] for name in row.split("|")[1].split(",")}
    modules = {".".join(p.relative_to(PACKAGE).with_suffix("").parts).replace(".", "/")
               for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    assert modules - listed == set(), "modules missing from docs/architecture.md's module table"
    assert {m for m in listed if m != "web"} - modules == set(), "docs/architecture.md names modules that do not exist"


def test_the_cli_takes_learn_s_defaults_and_choices_from_the_recipe():
    from dataclasses import fields

    from laionfilter.recipe import CALIBRATIONS, INITS, LearnConfig

    learn = cli.commands["learn"]
    params = {p.name: p for p in learn.params}
    shared = [f.name for f in fields(LearnConfig)]
    assert set(shared) <= set(params)  # every field of the recipe is a learn option
    for name in shared:
        if not params[name].is_flag:  # a flag is off unless given, as the config's booleans are
            assert params[name].default == getattr(LearnConfig(), name), name
    assert list(params["init"].type.choices) == list(INITS)
    assert list(params["calibration"].type.choices) == [*CALIBRATIONS, "none"]


def test_the_command_line_loads_without_torch():
    # `laionfilter --help` and a typo's error should not wait for torch (seconds): the defaults come from
    # recipe.py, which imports none of it.
    import subprocess
    import sys

    code = "import sys, laionfilter.cli; print(sorted(m for m in ('torch', 'numpy', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_test_suite_s_conftest_loads_without_torch():
    # Under pytest-xdist the controller process loads conftest.py and runs no test: importing torch there
    # cost the whole suite about 5 s before any worker started.
    import subprocess
    import sys

    code = "import sys, tests.conftest; print(sorted(m for m in ('torch', 'open_clip', 'laionfilter') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert out.strip() == "[]"


def test_every_progress_bar_comes_from_log():
    """So that every bar refreshes slowly in a log file (``log.progress_bar``): no module builds its own."""
    direct = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "log.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    "tqdm" in name for name in [getattr(node, "module", None) or ""] + [a.name for a in node.names]):
                direct.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert direct == []
