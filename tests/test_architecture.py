"""The house's import rules, read from the source (no module is imported):

- no import cycle among the modules of webapp/, workers/ and tunedeck_cli/, counting imports inside functions
  (a function-local import that dodges a cycle at load time is still a cycle in the design);
- a webapp app imports only the apps below it (`APP_LAYERS`), and workers' parts only the parts below them
  (`WORKER_LAYERS`);
- no module imports another module's `_private` name;
- the data plane never imports Django, and the CLI client imports neither Django, torch nor the control plane.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("webapp", "workers", "tunedeck_cli")

# Lowest first: an app may import itself and the apps before it, never one after it.
APP_LAYERS = ("jobs", "catalog", "fleet", "training", "playground", "sweeps", "api", "dashboard")
WORKER_LAYERS = ("config", "formatting", "contract", "data", "generation", "grading", "training", "adapters", "runtime")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


MODULES = source_modules()


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import, at any depth, except those under `if TYPE_CHECKING:` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(module: str) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in `module`; a `from package import
    submodule` counts as an import of the submodule."""
    tree = ast.parse(MODULES[module].read_text())
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
            continue
        target = resolve(module, node)
        for alias in node.names:
            child = f"{target}.{alias.name}"
            if child in MODULES:
                yield child, None, node.lineno
            else:
                yield target, alias.name, node.lineno


def internal(name: str) -> str | None:
    """The module of ours that an import names (a dotted name may end in a function or class)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for target, _, _ in imported(module):
            hit = internal(target)
            # A package's __init__ is imported on the way to its modules; count edges between modules only.
            if hit and hit != module and not module.startswith(hit + "."):
                edges[module].add(hit)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(edges).union(*edges.values())):
        if node not in index:
            visit(node)
    return found


def layer(module: str, package: str, layers: tuple[str, ...]) -> int | None:
    parts = module.split(".")
    if parts[0] != package or len(parts) < 2 or parts[1] not in layers:
        return None
    return layers.index(parts[1])


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


@pytest.mark.parametrize(("package", "layers"), [("webapp", APP_LAYERS), ("workers", WORKER_LAYERS)])
def test_parts_import_only_the_parts_below_them(package: str, layers: tuple[str, ...]) -> None:
    upward = []
    for module, targets in graph().items():
        own = layer(module, package, layers)
        for target in targets:
            theirs = layer(target, package, layers)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} imports {target}")
    assert sorted(upward) == []


def test_no_module_imports_another_modules_private_names() -> None:
    private = []
    for module in MODULES:
        for target, name, line in imported(module):
            if name and name.startswith("_") and not name.startswith("__") and internal(target) not in (None, module):
                private.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {name} from {target}")
    assert private == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("workers", ("django", "webapp", "tunedeck_cli")), ("tunedeck_cli", ("django", "torch", "webapp"))],
)
def test_planes_keep_to_themselves(package: str, forbidden: tuple[str, ...]) -> None:
    found = []
    for module in MODULES:
        if module.split(".")[0] != package:
            continue
        for target, _, line in imported(module):
            if target.split(".")[0] in forbidden:
                found.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert found == []


def test_the_checks_see_what_they_check() -> None:
    """The rules above pass vacuously if the parser finds nothing: it must see real edges and real layers."""
    edges = graph()
    assert "workers.contract.spec" in edges["webapp.training.models"]
    assert any(layer(m, "webapp", APP_LAYERS) is not None for m in edges)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
