"""The layering contract: packages and modules in layers, every `sft_cli` import (module-level or inside a
function) going down, never up; no import cycles; no private name imported across modules; the engine using
only the task interface. `make lint` runs this file.

Layers, top to bottom (a module may import from its own layer when that makes no cycle, and from any layer
below):

    cli -> commands -> engine -> tasks -> model | chat -> data | ui -> config | rundir -> errors
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sft_cli"
LAYERS: list[tuple[str, list[str]]] = [
    ("cli", ["sft_cli.cli", "sft_cli.__main__"]),
    ("commands", ["sft_cli.commands"]),
    ("engine", ["sft_cli.engine"]),
    ("tasks", ["sft_cli.tasks"]),
    ("model | chat", ["sft_cli.model", "sft_cli.chat"]),
    ("data | ui", ["sft_cli.data", "sft_cli.ui"]),
    ("config | rundir", ["sft_cli.config", "sft_cli.rundir"]),
    ("errors", ["sft_cli.errors", "sft_cli.environment", "sft_cli"]),
]
ENGINE_MAY_IMPORT_FROM_TASKS = {"sft_cli.tasks.base"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("sft_cli", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for every sft_cli import in a module, wherever it sits."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            if target.startswith("sft_cli"):
                for alias in node.names:
                    module = f"{target}.{alias.name}"
                    found.append((module, "") if module in known else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("sft_cli")]
    return found


def layer_of(name: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return best[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {module for module, _ in imports(name, path, known) if module in known and module != name}
        for name, path in known.items()
    }


def test_every_module_is_in_a_layer_and_imports_only_downward():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for name, targets in graph().items()
        for target in targets
        if layer_of(target) < layer_of(name)
    ]
    assert not upward, "imports must go down the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_even_through_function_level_imports():
    edges, cycles = graph(), []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [
        f"{name} imports {target}.{imported}"
        for name, path in known.items()
        for target, imported in imports(name, path, known)
        if imported.startswith("_") and target != name
    ]
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_the_engine_uses_only_the_task_interface():
    engine = LAYERS[[n for n, _ in LAYERS].index("engine")][1]
    reaching = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if any(name == p or name.startswith(p + ".") for p in engine)
        for target in targets
        if target.startswith("sft_cli.tasks") and target not in ENGINE_MAY_IMPORT_FROM_TASKS
    ]
    assert not reaching, "the engine may import only the task interface (sft_cli.tasks.base):\n" + "\n".join(reaching)


def test_every_module_sits_in_its_layer_package():
    """The folders show the layers: nothing but the entry points and the bottom layer lies loose in sft_cli/."""
    loose = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "environment.py", "errors.py"], loose
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    layered = {prefix.split(".")[1] for _, prefixes in LAYERS for prefix in prefixes if prefix.count(".") == 1}
    assert set(packages) <= layered, f"packages in no layer: {set(packages) - layered}"


def test_one_task_list_in_schema_specs_and_registry():
    """Adding a task is its module, its registry line and its spec; none can be forgotten."""
    from sft_cli.config.schema import TASKS
    from sft_cli.tasks.registry import TASKS as REGISTRY
    from sft_cli.tasks.specs import TASK_SPECS

    assert list(TASKS) == list(TASK_SPECS) == list(REGISTRY)
    assert all(spec.command in ("finetune", "pretrain") for spec in TASK_SPECS.values())
