"""The package's shape: no import cycles between its modules (type-only imports aside), no file over
300 lines, the run engine's main function on a screen, and `import compress` light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """compress modules `path` imports, at module level or inside functions (what it depends on);
    imports under `if TYPE_CHECKING:` are left out (they never run)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                 for stmt in block.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compress"):
            for alias in node.names:  # `from compress.x import y` may import the module compress.x.y
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("compress"))
    return found & modules


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    # a package's __init__ runs before its submodules: `compress.methods` importing its built-ins is
    # the registry's loading, not a dependency of those modules on the package
    return {name: {m for m in _imports(path, modules) if m != name} for name, path in paths.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "compress":  # the package's public face imports the API module only
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_lower_layers_never_import_higher_ones():
    order = ["errors", "settings", "cleanup", "leftovers", "stopping", "launch", "progress", "runlog", "formats", "model", "methods", "recipe",
             "state", "calibration", "kernels", "train", "deploy", "pipeline", "service", "api", "summary", "run_command", "cli", "__main__"]
    def layer(module: str) -> int:
        parts = module.split(".")
        return order.index(parts[1]) if len(parts) > 1 else len(order)

    wrong = [(a, b) for a, deps in _graph().items() for b in deps
             if b != "compress" and layer(b) > layer(a)]
    assert not wrong, f"lower layers import higher ones: {wrong}"


def test_no_file_over_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_run_engine_fits_on_a_screen():
    from compress.pipeline import engine

    source = ast.parse(Path(engine.__file__).read_text())
    run = next(node for node in source.body if isinstance(node, ast.FunctionDef) and node.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 40
    assert len(Path(engine.__file__).read_text().splitlines()) <= 100


def test_import_is_light():
    code = "import sys, compress; print(','.join(m for m in ('torch', 'transformers', 'prefect', 'mlflow') if m in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == ""
