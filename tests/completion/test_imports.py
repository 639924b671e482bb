"""The completion package stays light: no LLM library is ever imported by it."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import completion

FORBIDDEN = ("transformers", "peft", "trl", "outlines")


def test_completion_never_imports_llm_libraries():
    modules = [f"completion.{m.name}" for m in pkgutil.iter_modules(completion.__path__)]
    code = (f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(n for n in {FORBIDDEN!r} if n in sys.modules))")
    root = Path(completion.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root)
    assert out.stdout.strip() == "[]"
