"""The layout shows the architecture: one-way imports toward the core, no cycle, no reach into privates."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atlasengine"

# What each part may import from the engine (besides itself). The torch module knows nothing of
# training, storage or files; the training plan nothing of storage; only the API composes all.
CORE = {"config", "errors", "numerics", "progress", "faults", "version", "figures"}
ALLOWED = {
    "errors": set(),
    "version": set(),
    "faults": set(),
    "figures": set(),
    "progress": set(),
    "config": {"errors"},
    "numerics": {"errors"},
    "model": CORE,
    "training": CORE | {"model"},
    "continual": CORE | {"model", "training"},
    "transfer": CORE,
    "drift": CORE,
    "store": CORE | {"transfer"},
    "api": CORE | {"model", "training", "continual", "transfer", "drift", "store", "datasets"},  # example_atlas
    "datasets": set(),
    "cli": CORE | {"api", "transfer", "datasets", ""},  # "": the package root, which is the API
}
# Third-party libraries a part must not touch.
FORBIDDEN = {
    "model": {"lightning", "tiledbsoma", "duckdb", "faiss", "anndata", "safetensors"},
    "training": {"tiledbsoma", "duckdb", "faiss", "anndata", "safetensors"},
    "continual": {"tiledbsoma", "duckdb", "anndata", "safetensors"},
    "transfer": {"torch", "lightning", "tiledbsoma", "duckdb", "anndata"},  # the model's ELBO lives in model/
    "drift": {"lightning", "tiledbsoma", "anndata"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every module an engine file imports, at any depth (function-level imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {m for m in _imports(path) if m in modules and m != name}
        graph[name] = targets
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_import_cycle_between_engine_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how packages expose names
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def _resolve(target: str, modules: set[str]) -> str:
    """The engine module an import names (``atlasengine.Atlas`` is the package root)."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def test_imports_point_toward_the_core():
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        part = _part(name)
        if not part:
            continue
        for target in _imports(path):
            top = target.split(".")[0]
            if top == "atlasengine":
                other = _part(_resolve(target, modules))
                if other != part and other not in ALLOWED.get(part, set()):
                    wrong.append(f"{name} imports {target}")
            elif top in FORBIDDEN.get(part, set()):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_module_reaches_into_another_objects_privates():
    """Outside a class's own module, nothing reads ``obj._name`` (ruff's SLF001, checked here too)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls", "torch", "faiss", "os"):  # os._exit
                    continue
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                    continue  # a subclass calling the method it overrides
                if isinstance(base, ast.Attribute) and base.attr == "ctx":
                    continue
                # an object of the class defined in this very module (e.g. a copy made in a method)
                if isinstance(base, ast.Name) and _defines_class_using(tree, base.id, node.attr):
                    continue
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def _defines_class_using(tree: ast.Module, name: str, attr: str) -> bool:
    """Whether ``name._attr`` sits inside a class that defines ``_attr`` itself (a method or ``self._attr``)."""
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        owns = any(isinstance(n, ast.FunctionDef) and n.name == attr for n in cls.body) or any(
            isinstance(t, ast.Attribute) and t.attr == attr and isinstance(t.value, ast.Name) and t.value.id == "self"
            for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        )
        uses = any(isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.value, ast.Name)
                   and n.value.id == name for n in ast.walk(cls))
        if owns and uses:
            return True
    return False
