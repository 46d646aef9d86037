"""The package layout's promises: `core/` is free of Dagster, and the product does not load the demo generator."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "mondrian_assets" / "core"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_core_imports_neither_dagster_nor_the_dagster_layer():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 20  # the walk found the package, subpackages included
    offending = {
        f"{path.relative_to(CORE)}: {module}"
        for path in files
        for module in imported_modules(path)
        if module.split(".")[0] in ("dagster", "dagster_webserver") or module.startswith("mondrian_assets.defs")
    }
    assert not offending


def test_loading_the_definitions_does_not_import_the_demo():
    code = "import sys, mondrian_assets.definitions; print([m for m in sys.modules if 'mondrian_assets.demo' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
