"""On-device export of a PITuning student: weights + config in one safetensors file, reload without a
download, and CPU latency at batch size 1."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scope.io import atomic_path
from scope.pituning.data import IntentSamples
from scope.pituning.model import BackboneConfig, IntentPredictor, PredictorConfig
from scope.pituning.train import _device


def export_student(model: IntentPredictor, path: str | Path, meta: dict | None = None) -> int:
    """Weights as safetensors (config in the metadata), written atomically; returns the file size."""
    path = Path(path)
    metadata = {"model": json.dumps(model.describe(), default=str), "meta": json.dumps(meta or {}, default=str)}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
                  metadata=metadata)
    return path.stat().st_size


def load_weights(path: str | Path, model: IntentPredictor) -> IntentPredictor:
    """Load exported weights into an already built model (e.g. one whose backbone came from a Hub id)."""
    model.load_state_dict(load_file(str(path), device=str(_device(model))))
    return model.eval()


def load_student(path: str | Path) -> IntentPredictor:
    """Rebuild an exported student (no download: its backbone is rebuilt from the stored config)."""
    with safe_open(str(path), framework="pt") as f:
        described = json.loads(f.metadata()["model"])
    p = described["predictor"]
    cfg = PredictorConfig(backbone=BackboneConfig(**p.pop("backbone")), **p)
    model = IntentPredictor(cfg, described["vocab"], described["n_intents"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.inference_mode()
def cpu_latency_ms(model: IntentPredictor, samples: IntentSamples, repeats: int = 200, warmup: int = 20,
                   quantile: float = 0.5) -> float:
    """Wall time of one prediction (batch size 1, the current thread count) in milliseconds: the
    ``quantile`` of ``repeats`` timed calls (the median by default; a low quantile shows the cost
    without the pre-emptions of a shared machine)."""
    model = model.eval().cpu()
    times = []
    for i in range(warmup + repeats):
        x = samples[i % len(samples): i % len(samples) + 1].inputs()
        start = time.perf_counter()
        model(x)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * float(np.quantile(times, quantile))
