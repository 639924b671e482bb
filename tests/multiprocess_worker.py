"""One rank of a multi-process test job (tests/test_multiprocess.py): runs recipe jobs in order and
records, per job and rank, what this rank did, into ``<records>/<job>.rank<r>.json``.

    torchrun --nproc_per_node 2 tests/multiprocess_worker.py JOBS.json
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 2 \
        tests/multiprocess_worker.py JOBS.json

JOBS.json: ``{"records": DIR, "jobs": [{"name": ..., "stage": "sft" | "dpo" | "complete", "argv": [...]}]}``;
each job calls the recipe's own ``main`` with ``argv`` (which must name ``--output_dir``), as its
``__main__`` would. The recipes are observed, not changed:

- ``samples``: per optimiser step, the training rows this rank computed the loss on (SFT / DPO:
  indices into the trainer's train_dataset, found from the token ids; completion: the rows of
  ``data[rows]`` that fed ``train_step``);
- ``step_s``: wall time of each optimiser step (forward, backward, gradient exchange, update);
- ``weights``: SHA-256 of the trained weights after the run (trainable parameters for LoRA; the
  model, EMA and U-MASK bank for completion);
- ``writes``: files under ``output_dir`` this rank opened for writing or renamed into place
  (Python's open / os.open, os.replace / rename, safetensors' save_file, torch.save);
- ``result``: what the recipe's ``main`` returned (JSON-able values), ``global_step``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STATE = {"watch": None, "writes": set()}


# --- who writes what ---------------------------------------------------------------------------

def _note(path) -> None:
    if STATE["watch"] is None or isinstance(path, int):
        return
    path = Path(os.fsdecode(path)).resolve()
    if path.is_relative_to(STATE["watch"]):
        STATE["writes"].add(str(path.relative_to(STATE["watch"])))


def _audit(event: str, args) -> None:
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writing:
            _note(path)
    elif event == "os.rename":
        _note(args[1])


def _watch_native_writers() -> None:
    """safetensors (Rust) and torch.save (C++) write without Python's open: note their paths."""
    import safetensors.torch
    import torch.serialization

    serialize_file = safetensors.torch.serialize_file

    def noted_serialize_file(tensors, filename, *args, **kwargs):
        _note(filename)
        return serialize_file(tensors, filename, *args, **kwargs)

    zip_writer = torch.serialization._open_zipfile_writer

    def noted_zip_writer(name_or_buffer):
        if isinstance(name_or_buffer, (str, os.PathLike)):
            _note(name_or_buffer)
        return zip_writer(name_or_buffer)

    safetensors.torch.serialize_file = noted_serialize_file
    torch.serialization._open_zipfile_writer = noted_zip_writer


def weights_hash(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- SFT / DPO: a trainer subclass that records ------------------------------------------------

def _observed(trainer_class, record: dict):
    """``trainer_class`` recording each step's rows, its time and the final trainable weights."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record["_t0"] = time.perf_counter()
            record["samples"].append([])

        def on_step_end(self, args, state, control, **kwargs):
            record["step_s"].append(time.perf_counter() - record.pop("_t0"))

    class Observed(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepClock())
            self._full = None

        def _row_of(self, sequences: tuple) -> int:
            """The train_dataset row whose token ids these are (truncation keeps their start); -1: none or several."""
            if self._full is None:
                self._full = [_row_sequences(row) for row in self.train_dataset]
            found = [i for i, full in enumerate(self._full)
                     if all(f[:len(s)] == s for f, s in zip(full, sequences, strict=True))]
            return found[0] if len(found) == 1 else -1

        def training_step(self, model, inputs, *args, **kwargs):
            record["samples"][-1] += [self._row_of(s) for s in _batch_sequences(inputs, self.train_dataset)]
            return super().training_step(model, inputs, *args, **kwargs)

        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            record["weights"] = weights_hash(p for p in self.model.parameters() if p.requires_grad)
            record["global_step"] = self.state.global_step
            return out

    return Observed


def _is_dpo(dataset) -> bool:
    return "chosen_ids" in dataset.column_names


def _row_sequences(row: dict) -> tuple:
    """A tokenized row's sequences: SFT (prompt + completion), DPO (prompt + chosen, prompt + rejected)."""
    if "chosen_ids" in row:
        return tuple(row["prompt_ids"] + row["chosen_ids"]), tuple(row["prompt_ids"] + row["rejected_ids"])
    return (tuple(row["input_ids"]),)


def _batch_sequences(inputs: dict, dataset) -> list[tuple]:
    """Per example of a collated batch, its sequences without the padding (DPO's collator puts the
    chosen sequences first, then the rejected ones)."""
    ids = inputs["input_ids"]
    rows = [tuple(i[m.bool()].tolist()) for i, m in zip(ids, inputs.get("attention_mask", torch.ones_like(ids)))]
    if _is_dpo(dataset):
        n = len(rows) // 2
        return [(rows[k], rows[n + k]) for k in range(n)]
    return [(r,) for r in rows]


def run_trl(stage: str, argv: list[str], record: dict):
    from trl import DPOConfig, ModelConfig, SFTConfig

    from recipes import dpo, sft
    from scope.cli import parse_config

    recipe, script_args, config, trainer = {"sft": (sft, sft.SFTScriptArguments, SFTConfig, "SFTTrainer"),
                                            "dpo": (dpo, dpo.DPOScriptArguments, DPOConfig, "DPOTrainer")}[stage]
    original = getattr(recipe, trainer)
    setattr(recipe, trainer, _observed(original, record))
    try:
        return recipe.main(*parse_config((script_args, config, ModelConfig), argv))
    finally:
        setattr(recipe, trainer, original)


# --- completion ----------------------------------------------------------------------------------

def run_complete(argv: list[str], record: dict):
    import completion.train as engine
    from completion.batch import Batch
    from recipes import complete

    getitem, train_step, update_ema, train = Batch.__getitem__, engine.train_step, engine.update_ema, complete.train
    last = {}

    def noted_getitem(self, index):
        last["rows"] = index
        return getitem(self, index)

    def noted_train_step(*args, **kwargs):
        record["_t0"] = time.perf_counter()
        record["samples"].append(last["rows"].tolist())
        return train_step(*args, **kwargs)

    def noted_update_ema(*args, **kwargs):
        update_ema(*args, **kwargs)
        record["step_s"].append(time.perf_counter() - record.pop("_t0"))

    def noted_train(*args, **kwargs):
        model, ema, logs = train(*args, **kwargs)
        record["weights"] = weights_hash([*model.state_dict().values(), *ema.state_dict().values()])
        record["logs"] = logs
        return model, ema, logs

    Batch.__getitem__, engine.train_step, engine.update_ema, complete.train = (
        noted_getitem, noted_train_step, noted_update_ema, noted_train)
    try:
        return complete.main(argv)
    finally:
        Batch.__getitem__, engine.train_step, engine.update_ema, complete.train = getitem, train_step, update_ema, train


# --- main ----------------------------------------------------------------------------------------

def _jsonable(result) -> dict:
    return {k: v for k, v in (result or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}


def main(jobs_file: str) -> None:
    spec = json.loads(Path(jobs_file).read_text())
    sys.addaudithook(_audit)
    _watch_native_writers()
    rank = int(os.environ.get("RANK", "0"))
    for job in spec["jobs"]:
        argv = job["argv"]
        STATE["watch"] = Path(argv[argv.index("--output_dir") + 1]).resolve()
        STATE["writes"] = set()
        record = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "samples": [], "step_s": []}
        start = time.perf_counter()
        if job["stage"] == "complete":
            result = run_complete(argv, record)
        else:
            result = run_trl(job["stage"], argv, record)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # every rank's writes are done before any rank's record says so
        record |= {"result": _jsonable(result), "wall_s": time.perf_counter() - start,
                   "writes": sorted(STATE["writes"])}
        STATE["watch"] = None
        out = Path(spec["records"]) / f"{job['name']}.rank{rank}.json"
        out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
