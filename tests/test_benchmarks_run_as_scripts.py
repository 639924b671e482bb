"""Every benchmark loads both as a module (``python -m benchmarks.x``) and as a script
(``python benchmarks/x.py``, where only ``benchmarks/`` is on the path)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, runpy, sys
from pathlib import Path
bench = Path(sys.argv[1])
names = sorted(p.stem for p in bench.glob("*.py") if p.stem != "__init__")
sys.path[0] = str(bench)  # what `python benchmarks/x.py` puts first; the repository root is not on the path
for name in names:
    runpy.run_path(str(bench / f"{name}.py"), run_name="__loaded__")
    importlib.import_module(f"benchmarks.{name}")
print(len(names))
"""


def test_every_benchmark_loads_as_a_script_and_as_a_module(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHECK, str(ROOT / "benchmarks")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == len([p for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"])
