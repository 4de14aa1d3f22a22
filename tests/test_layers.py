"""The import graph keeps its layers: models and data below the kit, the kit below the jobs, jobs independent
of each other, experiments above the jobs, argument parsing in scripts/. Imports inside functions count."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"pipelines.train_tokenizer", "pipelines.cache_latents", "pipelines.train_generator", "pipelines.sample",
        "pipelines.evaluate"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PATHS = {_module_name(path): path for package in ("tokenizer", "generator", "data", "pipelines")
         for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Modules `path` imports at run time (not under `if TYPE_CHECKING:`); `from package import submodule`
    counts as the submodule only."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(PATHS)
            names.update(submodules or {node.module})
    return names


def _graph() -> dict[str, set[str]]:
    return {module: _imports(path) for module, path in PATHS.items()}


def _layer(module: str) -> int:
    if module.startswith(("tokenizer", "generator", "data")):
        return 0
    if module.startswith("pipelines.kit"):
        return 1
    if module in JOBS:
        return 2
    return 3  # pipelines.experiments (and the package docstring)


def test_no_upward_import_and_no_job_imports_a_job():
    graph = _graph()
    problems = []
    for module, imported in graph.items():
        for target in imported:
            if target not in graph or target == module or target.startswith("pipelines.experiments") and module == "pipelines":
                continue
            if _layer(target) > _layer(module):
                problems.append(f"{module} imports {target} (a higher layer)")
            elif module in JOBS and target in JOBS:
                problems.append(f"job {module} imports job {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    graph = {m: {t for t in targets if t in PATHS} for m, targets in _graph().items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):] + [target])
                                     if target in trail else f"import cycle through {target}")
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_argument_parsing_lives_in_scripts():
    """No parser is built below scripts/ (reading a checkpoint that holds an argparse.Namespace is fine)."""
    users = [module for module, path in PATHS.items()
             if "ArgumentParser(" in path.read_text() or ".add_argument(" in path.read_text()]
    assert users == []
