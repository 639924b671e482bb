"""One-way dependencies, read from every import statement of the library: ``completion`` uses only
the shared helpers of ``scope`` (``scope.io``, ``scope.metrics``), never its LLM modules; ``scope``
never imports ``completion``; library code never imports ``recipes`` or ``benchmarks``."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"scope", "scope.io", "scope.metrics"}  # what completion may import from scope


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (``from scope import io`` -> ``scope.io``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names
                    if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists()}
    return out


def imports_of(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imported_modules(p) for p in sorted((ROOT / package).rglob("*.py"))}


def test_the_check_sees_every_kind_of_import(tmp_path):
    (tmp_path / "m.py").write_text("import a.b\nfrom c import d\nfrom scope import io\ndef f():\n    import e\n")
    assert {"a.b", "c", "scope", "scope.io", "e"} <= imported_modules(tmp_path / "m.py")


def test_completion_uses_only_the_shared_helpers_of_scope():
    bad = {f: sorted(m for m in mods if m.split(".")[0] == "scope" and m not in SHARED)
           for f, mods in imports_of("completion").items()}
    assert not {f: m for f, m in bad.items() if m}


def test_scope_never_imports_completion():
    bad = {f: sorted(m for m in mods if m.split(".")[0] == "completion") for f, mods in imports_of("scope").items()}
    assert not {f: m for f, m in bad.items() if m}


@pytest.mark.parametrize("package", ["scope", "completion"])
def test_library_code_never_imports_recipes_or_benchmarks(package):
    bad = {f: sorted(m for m in mods if m.split(".")[0] in ("recipes", "benchmarks"))
           for f, mods in imports_of(package).items()}
    assert not {f: m for f, m in bad.items() if m}
