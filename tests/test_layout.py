"""The layout: imports flow one way between packages, no module imports itself in a circle, and
an import inside a function says why in a comment (read from the source with ``ast``)."""

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Lowest layer first: a package may import only packages of its own layer or below.
LAYERS = ("config", "nets", "dataset", "utils", "tools")
ENTRY_POINTS = ("main.py", "distribute_main.py")
FIRST_PARTY = set(LAYERS) | {os.path.splitext(e)[0] for e in ENTRY_POINTS}


def _sources():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path
    for name in ENTRY_POINTS:
        yield ROOT / name


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """(imported first-party module, line number, inside a function?) of every import."""
    tree = ast.parse(path.read_text(), str(path))
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from utils import predict`` imports the module utils.predict
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in local


def _resolve(name: str, modules: set) -> str:
    """The first-party module an imported name refers to (a module, or the module holding it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _graph():
    paths = {_module_name(p): p for p in _sources()}
    modules = set(paths)
    edges = {}
    for module, path in paths.items():
        targets = set()
        for name, _, _ in _imports(path):
            if name.split(".")[0] in FIRST_PARTY:
                target = _resolve(name, modules)
                if target and target != module:
                    targets.add(target)
        edges[module] = targets
    return paths, edges


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def _upward(edges):
    return sorted(f"{a} imports {b}" for a, targets in edges.items() for b in targets if _layer(b) > _layer(a))


def _cycles(edges):
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return cycles


def test_packages_import_only_their_own_layer_or_below():
    _, edges = _graph()
    upward = _upward(edges)
    assert not upward, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    _, edges = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_local_imports_say_why():
    silent = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for _, lineno, local in _imports(path):
            if local:
                here, above = lines[lineno - 1], lines[lineno - 2].strip() if lineno > 1 else ""
                if "#" not in here and not above.startswith("#"):
                    silent.append(f"{path.relative_to(ROOT)}:{lineno}: {here.strip()}")
    assert not silent, "function-local imports without a comment giving the reason:\n" + "\n".join(silent)


def test_library_never_imports_benchmarks_or_tools():
    _, edges = _graph()
    offenders = sorted(f"{a} imports {b}" for a, targets in edges.items() for b in targets
                       if b.startswith("tools") and not a.startswith("tools"))
    assert not offenders, "\n".join(offenders)


def test_the_checks_find_what_they_look_for(tmp_path):
    """Not vacuous: an upward import and a cycle written into a copy of the graph are found,
    and an import statement resolves to the module it names."""
    paths, edges = _graph()
    assert "dataset.records" not in edges["nets.spr"]
    assert _upward({**edges, "nets.spr": edges["nets.spr"] | {"dataset.records"}}) == ["nets.spr imports dataset.records"]
    assert _cycles({**edges, "config.skeletons": {"config.config"}}) == [
        "config.config -> config.skeletons -> config.config"]
    src = tmp_path / "m.py"
    src.write_text("from utils.predict import Predictor\nimport dataset.records\n")
    assert [_resolve(n, set(paths)) for n, _, _ in _imports(src)] == ["utils.predict", "dataset.records"]
