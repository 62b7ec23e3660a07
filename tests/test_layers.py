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
    "runs": UPPER + ("deploy",), "probe": UPPER + ("deploy",),
    "masks": UPPER + ("deploy",), "topology": UPPER + ("deploy",), "optim": UPPER + ("deploy",),
    "models": UPPER + ("deploy",), "data": UPPER + ("deploy",), "native": UPPER + ("deploy",),
    "training_kernels": UPPER + ("deploy",),
    "deploy": UPPER,
    "integrations": ("train", "cli", "sweep", "analysis"),
    "train": ("cli", "sweep", "analysis", "integrations"),
}


def imported_packages(path: Path) -> set[str]:
    """The top-level sparseopt packages a module imports (relative and absolute, at any depth of the file)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(module.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level] if path.name != "__init__.py" else parts[: len(parts) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [target] if node.module else [[*target, alias.name] for alias in node.names]
            else:
                names = [node.module.split(".")] if node.module else []
            found |= {n[1] for n in names if len(n) > 1 and n[0] == "sparseopt"}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sparseopt.")}
    return found


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
