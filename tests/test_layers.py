"""Layers that point one way (issue 28): what each package may import, checked on the source and at run time."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparseopt"
UPPER = ("train", "cli", "sweep", "analysis", "integrations")
# package (or module) -> the packages it must never import
FORBIDDEN = {
    "files": UPPER + ("deploy",), "registry": UPPER + ("deploy",), "feeds": UPPER + ("deploy",),
    "figures": UPPER + ("deploy",), "timing": UPPER + ("deploy",), "messages": UPPER + ("deploy",),
    "runs": UPPER + ("deploy",), "probe": UPPER + ("deploy",), "version": UPPER + ("deploy",),
    "masks": UPPER + ("deploy",), "topology": UPPER + ("deploy",), "optim": UPPER + ("deploy",),
    "models": UPPER + ("deploy",), "data": UPPER + ("deploy",), "native": UPPER + ("deploy",),
    "training_kernels": UPPER + ("deploy",),
    "deploy": UPPER,
    "integrations": ("train", "cli", "sweep", "analysis"),
    "train": ("cli", "sweep", "analysis", "integrations"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The sparseopt modules a module imports (relative and absolute, at any depth of the file: imports placed
    inside functions count, since that is how an import circle hides)."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # `from X import y` imports the module X.y where there is one, else X
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in MODULES} - {module_name(path)}


def imported_packages(path: Path) -> set[str]:
    """The top-level sparseopt packages a module imports."""
    return {m.split(".")[1] for m in imported_modules(path) if "." in m}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_lower_floor_imports_nothing_above_it(package):
    root = PACKAGE / package
    files = sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE / f"{package}.py"]
    bad = {str(f.relative_to(PACKAGE)): sorted(imported_packages(f) & set(FORBIDDEN[package])) for f in files}
    assert not {f: b for f, b in bad.items() if b}


def test_the_config_module_imports_neither_the_builder_nor_the_naming_table():
    tree = ast.parse((PACKAGE / "train" / "config.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert not modules & {"build", "naming"}


def test_import_sparseopt_and_deploy_load_no_training_package():
    code = ("import sys, sparseopt, sparseopt.deploy.run; "
            "print(sorted(m for m in sys.modules if m.startswith('sparseopt.') and m.split('.')[1] in "
            "('train', 'cli', 'sweep', 'analysis', 'integrations')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycle_among_the_modules():
    graph = {m: imported_modules(f) for m, f in MODULES.items()}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:  # depth first; a module met again on the path closes a cycle
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert len(graph) > 50 and graph["sparseopt.train.spec"] >= {"sparseopt.train.config", "sparseopt.runs"}
    assert not cycles, [" -> ".join(c) for c in cycles[:5]]
