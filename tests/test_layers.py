"""The layers import one way, and no two source files import each other (directly or around a loop).

base (config, models, logging) <- protocol, rewards <- environments <- trainer, rollout <- cli.
Every import statement of every source file counts, inside functions too; only `if
TYPE_CHECKING:` blocks (never run) are left out. The module graph is read from the files
themselves with `ast`.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each layer may import, besides itself.
ALLOWED = {
    "base": set(),
    "protocol": {"base"},
    "rewards": {"base"},
    "environments": {"base", "rewards"},
    "trainer": {"base", "protocol", "rewards", "environments"},
    "rollout": {"base", "protocol", "rewards", "environments"},
    "cli": {"base", "protocol", "rewards", "environments", "trainer", "rollout"},
}


def source_modules() -> dict[str, Path]:
    """Every installed module name -> its file, from pyproject's package-dir mapping."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    for package, folder in setuptools["package-dir"].items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def layer(module: str) -> str:
    """`python -m swarmrl.trainer` and the like are the command line too."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "base"


def imports(path: Path, modules: set[str]) -> set[str]:
    """The swarmrl modules a file imports at run time."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
                break
    return found


def graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_layers_import_one_way() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)]
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    edges = graph()
    cycles, state = [], dict.fromkeys(edges, 0)  # 0 new, 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state[target] == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if state[module] == 0:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_the_imports_it_checks() -> None:
    edges = graph()
    assert "swarmrl.base.config" in edges["swarmrl.trainer.loop"]  # a top-level import
    assert "swarmrl.rollout.backends" in edges["swarmrl.rollout.worker"]  # inside a function
    assert "swarmrl.trainer.run" not in edges["swarmrl.trainer.ranks"]  # TYPE_CHECKING only
