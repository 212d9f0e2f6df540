"""The layout rules of README's "Architecture" section, checked on the source (no imports run).

Packages by stage, imported one way only (a package may import its own modules and the packages
before it in ``LAYERS``); no import cycle between modules; no private name imported from another
package; the project's own modules imported at the top of a module, never inside a function
(only heavy third-party libraries are imported where they are used); no module over 450 lines
and no package over 30% of the code.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The pipeline's stages, bottom to top.
LAYERS = ["covid_data", "covid_models", "covid_eval", "covid_registry", "covid_app", "tasks", "flows"]
MAX_MODULE_LINES = 450
MAX_PACKAGE_SHARE = 0.30


def _modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> list[tuple[str, list[str], bool, int]]:
    """(imported module, names, at module level?, line) for each import of the project's code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = set(map(id, tree.body))
    typing_only: set[int] = set()
    # `if __name__ == "__main__":` runs at module level; `if TYPE_CHECKING:` never runs (annotations only)
    for node in tree.body:
        if isinstance(node, ast.If):
            inner = {id(n) for n in ast.walk(node)}
            if "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only |= inner
            else:
                top |= inner
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and _package(node.module) in LAYERS:
            names = [a.name for a in node.names]
            for n in names:  # `from covid_eval import external` imports a module
                if f"{node.module}.{n}" in MODULES:
                    out.append((f"{node.module}.{n}", [], id(node) in top, node.lineno))
            out.append((node.module, names, id(node) in top, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _package(a.name) in LAYERS:
                    out.append((a.name, [], id(node) in top, node.lineno))
    return out


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{line}"


def test_imports_go_one_way_down_the_stages():
    bad = []
    for module, path in MODULES.items():
        mine = LAYERS.index(_package(module))
        for target, _, _, line in _imports(path):
            if LAYERS.index(_package(target)) > mine:
                bad.append(f"{_where(module, line)} imports {target} (a later stage)")
    assert not bad, "\n".join(bad)


def test_the_projects_own_modules_are_imported_at_the_top():
    bad = [
        f"{_where(module, line)} imports {target} inside a function"
        for module, path in MODULES.items()
        for target, _, top, line in _imports(path)
        if not top
    ]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_package():
    bad = [
        f"{_where(module, line)} imports {n} from {target}"
        for module, path in MODULES.items()
        for target, names, _, line in _imports(path)
        for n in names
        if n.startswith("_") and _package(target) != _package(module)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target, _, _, _ in _imports(path):
            target = target if target in MODULES else target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                graph[module].add(target)
    # A package's __init__ re-exporting its modules is not a cycle with them.
    graph = {
        m: {t for t in ts if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
        for m, ts in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(MODULES):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_modules_and_packages_stay_small():
    files = [*MODULES.values(), *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > 450]
    assert not long, "\n".join(long)
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    total = sum(lines.values())
    share = {pkg: sum(n for m, n in lines.items() if _package(m) == pkg) / total for pkg in LAYERS}
    big = {pkg: f"{s:.0%}" for pkg, s in share.items() if s > MAX_PACKAGE_SHARE}
    assert not big, f"packages over {MAX_PACKAGE_SHARE:.0%} of {total} lines: {big}"


def test_the_checks_see_a_violation(tmp_path):
    """The parser finds a function-level import and a private cross-package name (the checks can fail)."""
    src = tmp_path / "m.py"
    src.write_text("from covid_data.store import _x\n\ndef f():\n    from covid_models import train\n")
    found = _imports(src)
    assert ("covid_data.store", ["_x"], True, 1) in found
    assert ("covid_models.train", [], False, 4) in found
