"""On-device export of a PITuning student: weights + config in one safetensors file, reload without a
download; an ONNX graph (fp32, and dynamic int8 by ONNX Runtime's quantizer) for ONNX Runtime;
CPU latency at batch size 1 of eager PyTorch and of ONNX Runtime."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
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


class _Positional(nn.Module):
    """The student with one positional input per model input (what an ONNX graph takes)."""

    def __init__(self, model: IntentPredictor):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(dict(zip(self.model.input_names, inputs)))


def export_onnx(model: IntentPredictor, path: str | Path, example: IntentSamples) -> int:
    """The student as an ONNX graph (inputs: the five int64 feature tensors [B, L + 1] and, for a model
    with the routine prior, the float32 ``routine`` [B, N_I]; output: logits [B, N_I]; B dynamic),
    written atomically; returns the file size."""
    model = model.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = example[:2].inputs()
    inputs = tuple(x[name] for name in model.input_names)
    batch = {name: {0: "batch"} for name in (*model.input_names, "logits")}
    with atomic_path(path) as tmp, torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(_Positional(model).eval(), inputs, str(tmp), input_names=list(model.input_names),
                          output_names=["logits"], dynamic_axes=batch, dynamo=False)
    return path.stat().st_size


def quantize_int8(source: str | Path, target: str | Path) -> int:
    """ONNX Runtime's dynamic quantization (int8 weights of MatMul / Gemm, activations quantized per call);
    returns the file size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    target = Path(target)
    with atomic_path(target) as tmp:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
    return target.stat().st_size


def onnx_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input_names(session) -> list[str]:
    return [i.name for i in session.get_inputs()]


def _feeds(names: list[str], samples: IntentSamples) -> dict[str, np.ndarray]:
    x = samples.inputs()
    return {name: x[name].numpy() for name in names}


def onnx_predict(session, samples: IntentSamples, batch_size: int = 512) -> Tensor:
    """Logits [N, N_I] of an ONNX session."""
    names = _input_names(session)
    out = [torch.from_numpy(session.run(None, _feeds(names, samples[i:i + batch_size]))[0])
           for i in range(0, len(samples), batch_size)]
    return torch.cat(out)


def latency_ms(predict_one, samples: IntentSamples, repeats: int = 200, warmup: int = 20,
               quantile: float = 0.5) -> float:
    """Wall time of ``predict_one(sample)`` at batch size 1 in milliseconds: the ``quantile`` of ``repeats``
    timed calls (the median by default; a low quantile shows the cost without the pre-emptions of a
    shared machine)."""
    times = []
    for i in range(warmup + repeats):
        x = samples[i % len(samples): i % len(samples) + 1]
        start = time.perf_counter()
        predict_one(x)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * float(np.quantile(times, quantile))


def eager_predict_one(model: IntentPredictor):
    """Batch-1 eager PyTorch prediction (inference mode, CPU) for :func:`latency_ms`."""
    model = model.eval().cpu()

    @torch.inference_mode()
    def run(x: IntentSamples):
        return model(x.inputs())
    return run


def onnx_predict_one(session):
    """Batch-1 ONNX Runtime prediction for :func:`latency_ms`."""
    names = _input_names(session)
    return lambda x: session.run(None, _feeds(names, x))


def on_device_figures(user_dirs: list[Path], data, repeats: int = 200) -> dict:
    """Export each user's student (``<dir>/student.safetensors``) to ``student.onnx`` and
    ``student.int8.onnx``; top-1 agreement of ONNX Runtime with eager PyTorch on the user's test
    points, file sizes, and batch-1 latency (1 thread) of the three runtimes on the first user,
    measured back to back in one process so that their ratio holds under any machine load."""
    agree = {"fp32": [], "int8": []}
    sizes = {"fp32": [], "int8": []}
    latency = {}
    for i, folder in enumerate(user_dirs):
        model = load_student(folder / "student.safetensors")
        test = data.individual["test"].of_user(int(folder.name.removeprefix("user-")))
        if not len(test):
            continue
        sizes["fp32"].append(export_onnx(model, folder / "student.onnx", test))
        sizes["int8"].append(quantize_int8(folder / "student.onnx", folder / "student.int8.onnx"))
        sessions = {"fp32": onnx_session(folder / "student.onnx"), "int8": onnx_session(folder / "student.int8.onnx")}
        with torch.inference_mode():
            top1 = model(test.inputs()).argmax(1)
        for kind, session in sessions.items():
            agree[kind].append((onnx_predict(session, test).argmax(1) == top1).float())
        if i == 0:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            latency = {"eager": latency_ms(eager_predict_one(model), test, repeats),
                       "onnx": latency_ms(onnx_predict_one(sessions["fp32"]), test, repeats),
                       "onnx_int8": latency_ms(onnx_predict_one(sessions["int8"]), test, repeats)}
            torch.set_num_threads(threads)
    mean = lambda values: round(float(np.mean(values)), 4) if len(values) else None  # noqa: E731
    return {"student_ms_per_prediction": {k: round(v, 3) for k, v in latency.items()},
            "onnx_top1_agreement": {k: round(torch.cat(v).mean().item(), 4) if v else None for k, v in agree.items()},
            "onnx_file_mb": {k: mean(v) and round(mean(v) / 2**20, 3) for k, v in sizes.items()},
            "latency_threads": 1, "load_average_1min": round(os.getloadavg()[0], 2)}
