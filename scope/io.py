"""File helpers shared by every package: atomic writes (an artifact is either complete or absent,
never half-written), JSON, figures and training checkpoints.

This module imports nothing from the project, so ``scope`` and ``completion`` may both use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` (whose old
    content is removed only then), on failure it is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def save_checkpoint(path: str | Path, modules: dict, optimizer=None, generator=None, step: int = 0,
                    metadata: dict[str, str] | None = None) -> None:
    """One safetensors file with the state of ``modules`` (``{prefix: nn.Module}``; tensors named
    ``<prefix>.<key>``), the optimiser (``optim.<param>.<key>``, its param groups in the metadata),
    the RNG state and ``step``, written atomically: a crash mid-write keeps the previous checkpoint."""
    tensors = {f"{prefix}.{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()}
    meta = {"step": str(step)}
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, s in state["state"].items():
            tensors |= {f"optim.{i}.{k}": torch.as_tensor(v) for k, v in s.items()}
        meta["param_groups"] = json.dumps(state["param_groups"])
    if generator is not None:
        tensors["rng"] = generator.get_state()
    meta |= metadata or {}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors checkpoint."""
    return load_file(str(path)), checkpoint_metadata(path)


def checkpoint_section(tensors: dict, prefix: str) -> dict:
    """The tensors saved under ``<prefix>.``, with the prefix removed."""
    prefix = prefix.rstrip(".") + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(path: str | Path, modules: dict, optimizer=None, generator=None) -> tuple[int, dict[str, str]]:
    """Restore what is given from :func:`save_checkpoint`'s file; returns ``(step, metadata)``."""
    tensors, metadata = read_checkpoint(path)
    for prefix, module in modules.items():
        module.load_state_dict(checkpoint_section(tensors, prefix))
    if optimizer is not None and "param_groups" in metadata:
        per_param: dict[int, dict] = {}
        for k, v in checkpoint_section(tensors, "optim").items():
            i, name = k.split(".", 1)
            per_param.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": per_param, "param_groups": json.loads(metadata["param_groups"])})
    if generator is not None and "rng" in tensors:
        generator.set_state(tensors["rng"])
    return int(metadata["step"]), metadata
