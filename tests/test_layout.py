"""The package's layout holds: no import cycle, and the subpackages import only what their docstrings allow."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "midisc"


def imports() -> dict[str, set[str]]:
    """{module: the midisc modules it imports}, read from the source (nothing is imported)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("midisc"):
                deps |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("midisc")}
        found[name] = deps
    return {name: {d for d in deps if d in found and d != name} for name, deps in found.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_through_others():
    assert cycle(imports()) is None


def test_the_sae_package_imports_nothing_else_of_midisc():
    outside = {name: sorted(d for d in deps if not d.startswith("midisc.sae"))
               for name, deps in imports().items() if name.startswith("midisc.sae")}
    assert {name: deps for name, deps in outside.items() if deps} == {}


def test_the_data_package_imports_nothing_else_of_midisc():
    outside = {name: sorted(d for d in deps if not d.startswith("midisc.data"))
               for name, deps in imports().items() if name.startswith("midisc.data")}
    assert {name: deps for name, deps in outside.items() if deps} == {}


# Top-level modules that are not commands: what the commands share, the config and command-line checks, the run
# folder's names.
NOT_COMMANDS = {"midisc", "midisc.cli", "midisc.config", "midisc.jobs", "midisc.overrides", "midisc.run", "midisc.run_folder"}


def test_nothing_imports_a_command():
    graph = imports()
    packages = {name.rsplit(".", 1)[0] for name in graph}
    commands = {name for name in graph if name.count(".") == 1 and name not in NOT_COMMANDS | packages}
    assert {"midisc.train", "midisc.db", "midisc.export", "midisc.verify"} <= commands
    assert {name: sorted(deps & commands) for name, deps in graph.items() if deps & commands} == {}


def test_the_lower_packages_import_only_what_their_docstrings_allow():
    allowed = {"analysis": {"analysis", "sae", "data"}, "publish": {"publish", "sae", "analysis", "run_folder"},
               "store": {"store"}, "web": {"web", "store", "analysis", "data", "sae"},
               "interpretation": {"interpretation", "sae", "data", "analysis", "store"},
               "training": {"training", "sae", "data", "analysis", "store", "publish", "run_folder"}}
    wrong = {}
    for name, deps in imports().items():
        package = name.split(".")[1] if name.count(".") >= 1 else None
        if package in allowed:
            outside = sorted(d for d in deps if d.split(".")[1] not in allowed[package])
            if outside:
                wrong[name] = outside
    assert wrong == {}


def test_the_database_command_does_not_load_torch():
    # cli.py names the user errors instead of importing them, so `python -m midisc.db` starts in a blink.
    probe = "import sys, midisc.db; print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_every_user_error_named_in_cli_exists():
    import importlib

    from midisc.cli import USER_ERRORS

    for module, name in USER_ERRORS:
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)
