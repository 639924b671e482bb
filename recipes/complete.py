"""Train, calibrate, evaluate and apply the completion engine (U-MASK + DiT over a prior) on a
UoMo-format city file or on per-user tensors.

    python recipes/complete.py train     --config recipes/configs/complete_nj.yaml [--steps 4000 ...]
    python recipes/complete.py calibrate --config recipes/configs/complete_nj.yaml
    python recipes/complete.py evaluate  --config recipes/configs/complete_nj.yaml [--split test]
    python recipes/complete.py predict   --config recipes/configs/complete_nj.yaml [--split test]

train resumes from `output_dir/checkpoint.safetensors` when it exists, logs to TensorBoard
(`output_dir/tb`) and, with `calibrate: true`, ends by calibrating the residual's weight and the
samples' spread on the val split (what `calibrate` does alone). calibrate writes
`output_dir/calibration_<data>.json`; evaluate writes `output_dir/eval_<data>_<split>.json` (+ Fig.
8/9 PNGs under `output_dir/figures`); predict writes
`output_dir/predictions_<data>_<split>.safetensors` (point estimate and 90% interval in original
units, target and evidence masks, per task; app-category rankings on per-user tensors). `<data>` is
the data file's or folder's name, so one checkpoint evaluated on several files never overwrites a
result.

train runs data parallel under a launcher (`batch_size` is the global batch; see completion.train):

    torchrun --nproc_per_node 2 recipes/complete.py train --config ...   # CPU: gloo; GPUs: nccl, one each

Rank 0 alone writes args.json, TensorBoard, the checkpoint and the calibration; calibrate, evaluate
and predict are single-process commands.

A checkpoint applied to other data (another city, another step length) keeps its weights: the
slots per day of the data (from its timestamps) retune the calendar and the prior, the data's
own train split gives its normalisation, and a POI width other than the checkpoint's is refused
unless `pad_poi: true`. `evidence: auto` evaluates with the mask the checkpoint was trained with
(U-MASK, or the whole available region for a fixed-mask control).
"""

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from completion.batch import Batch
from completion.city import load_city
from completion.evaluate import EVIDENCE, calibrate, choose_prior, complete_chunked, task_regions, umask_outputs
from completion.figures import mask_figure, pattern_figure
from completion.masks import UMaskConfig
from completion.metrics import completion_report, prediction_interval
from completion.model import ModelConfig
from completion.recommend import app_channels, engagement, recommendation_report
from completion.tasks import TASKS, TaskConfig
from completion.tensors import BehaviourTensors
from completion.train import (CHECKPOINT, TrainConfig, check_resume, checkpoint_configs, distributed, load_model,
                              train)
from completion.users import REFERENCE_FILE, check_entity_reference, load_embeddings, save_entity_reference, user_batch
from scope.cli import parse_config, run_recipe
from scope.io import atomic_path, checkpoint_metadata, write_json

COMMANDS = ("train", "calibrate", "evaluate", "predict")


@dataclass
class CompleteArguments:
    """The recipe's own settings: which data, where to write, how to evaluate. The model, U-MASK,
    task and training settings are the library's configs, parsed beside this one."""

    data: str = "city"  # city (a UoMo-format .npz, e.g. NJ) | tensors (a recipes/tensorize.py output folder)
    data_path: str = "../shared/data/uomo-nj/nj_traffic_users_64.npz"
    pad_poi: bool = False  # city data with fewer POI categories than the checkpoint: zero-fill the missing ones
    embeddings: str | None = None  # per-user h_u (.npz/.safetensors: user_id, embedding); tensors only
    output_dir: str = "runs/complete/nj"
    max_entities: int = 0  # evaluate/predict on the first N entities of the split (0 = all)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    prior_damping_grid: list[float] = field(default_factory=list)  # non-empty: choose prior_damping on val among these
    prior_shrinkage_grid: list[float] = field(default_factory=list)  # non-empty: choose prior_shrinkage on val too
    log_every: int = 10
    calibrate: bool = True  # after training, calibrate the residual weight and the samples' spread on val
    # evaluation / prediction
    split: str = "test"
    eval_tasks: list[str] = field(default_factory=lambda: ["short", "long"])
    evidence: str = "auto"  # auto (the checkpoint's training mask) | umask | available (the whole available region)
    n_samples: int = 8
    sampler_steps: int = 20
    figures: bool = True

    def __post_init__(self):
        if isinstance(self.eval_tasks, str):
            raise ValueError(f"eval_tasks is a list of task names, got {self.eval_tasks!r}")
        small = {k: getattr(self, k) for k in ("n_samples", "sampler_steps", "log_every") if getattr(self, k) < 1}
        if small or self.max_entities < 0:
            raise ValueError(f"n_samples, sampler_steps and log_every must be >= 1 and max_entities >= 0, got "
                             f"{small or self.max_entities}")
        if self.data not in ("city", "tensors"):
            raise ValueError(f"unknown data {self.data!r}; expected 'city' or 'tensors'")
        unknown = set(self.eval_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"eval_tasks: unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
        if self.evidence not in ("auto", *EVIDENCE):
            raise ValueError(f"unknown evidence {self.evidence!r}; expected 'auto' or one of {EVIDENCE}")

    @property
    def data_name(self) -> str:
        """The data file's (or folder's) name, which result files are named by."""
        path = Path(self.data_path)
        return path.stem if self.data == "city" else path.name


@dataclass
class Configs:
    """Everything one command reads: the recipe's arguments and the library's configs."""

    args: CompleteArguments
    model: ModelConfig  # shape fields are filled from the data; U-MASK's settings inside
    task: TaskConfig
    train: TrainConfig


@dataclass
class Data:
    batch: Batch
    inverse: Callable[[Tensor], Tensor]  # normalised [..., C, T, H, W] -> original units
    channels: list[str]
    slots_per_day: int
    user_id: np.ndarray | None = None


def load_split(cfg: Configs, split: str, cell_dim: int | None = None, engine_dir: str | Path | None = None) -> Data:
    """One split of the configured data, at the configured slots per day (`slots_per_day`, 0 = from
    the data's timestamps); `cell_dim` (a checkpoint's POI width) is checked against the data's, and
    the user embeddings against those the engine in `engine_dir` was trained on."""
    args, slots_per_day = cfg.args, cfg.model.slots_per_day
    if args.data == "city":
        city = load_city(args.data_path, slots_per_day, cell_dim, args.pad_poi)
        if split not in city.batches:
            raise ValueError(f"{args.data_path}: unknown split {split!r}; expected one of {sorted(city.batches)}")
        channels = ["traffic", "users"] if city.raw[split].shape[1] == 2 else \
            [f"channel_{c}" for c in range(city.raw[split].shape[1])]
        return Data(city.batches[split], city.inverse, channels, city.slots_per_day)
    tensors = BehaviourTensors(args.data_path, split)
    embeddings = load_embeddings(args.embeddings) if args.embeddings else None
    batch, users = user_batch(tensors, embeddings)
    reference = Path(engine_dir) / REFERENCE_FILE if engine_dir is not None else None
    if reference is not None and reference.exists():
        if embeddings is None:
            raise ValueError(f"the engine beside {reference} was trained on user embeddings: pass them (--embeddings)")
        check_entity_reference(reference, embeddings.user_id, embeddings.embedding, args.embeddings)

    def inverse(z):
        return tensors.normalizer.inverse_transform(z, channel_axis=z.dim() - 4)
    spd = 1440 // tensors.meta["config"]["slot_minutes"]
    if slots_per_day and slots_per_day != spd:
        raise ValueError(f"{args.data_path}: the tensors have {spd} slots per day, the configuration says "
                         f"{slots_per_day}")
    return Data(batch, inverse, tensors.channels, spd, users)


def _threads(args: CompleteArguments) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_train(cfg: Configs) -> dict:
    args, model_config, train_config = cfg.args, cfg.model, cfg.train
    data = load_split(cfg, "train")
    _, C, T, H, W = data.batch.x.shape
    if args.prior_damping_grid or args.prior_shrinkage_grid:
        val = load_split(cfg, "val").batch
        damping, shrinkage, scores = choose_prior(
            data.batch, val, train_config.tasks, cfg.task, data.slots_per_day, model_config.prior_seasonal,
            model_config.center, tuple(args.prior_damping_grid or [model_config.prior_damping]),
            tuple(args.prior_shrinkage_grid or [model_config.prior_shrinkage]))
        model_config = replace(model_config, prior_damping=damping, prior_shrinkage=shrinkage)
        print(f"prior_damping {damping}, prior_shrinkage {shrinkage} chosen on val "
              f"(RMSE of the prior alone, damping/shrinkage: {scores})")
    model_config = replace(model_config, channels=C, T=T, cell_dim=data.batch.cells.shape[-1],
                           entity_dim=data.batch.entity.shape[-1], slots_per_day=data.slots_per_day)
    run = Path(args.output_dir)
    checkpoint = run / CHECKPOINT
    resumed_at = None
    if checkpoint.exists():  # refuse other settings before anything is written
        check_resume(checkpoint, model_config, train_config, cfg.task)
        resumed_at = int(checkpoint_metadata(checkpoint)["step"]) + 1  # the first step not in the checkpoint
    rank, _ = distributed(train_config.device)  # several processes: rank 0 writes, all train
    if rank == 0:
        write_json(run / "args.json", settings(replace(cfg, model=model_config)))  # with the prior chosen on val
        if args.data == "tensors" and args.embeddings:   # the embeddings it learns h_u from, checked by every later command
            embeddings = load_embeddings(args.embeddings)
            if checkpoint.exists() and (run / REFERENCE_FILE).exists():   # resuming: the same embeddings
                check_entity_reference(run / REFERENCE_FILE, embeddings.user_id, embeddings.embedding, args.embeddings)
            else:
                save_entity_reference(run / REFERENCE_FILE, embeddings.user_id, embeddings.embedding)
    # drop steps logged after the checkpoint
    tensorboard = SummaryWriter(str(run / "tb"), purge_step=resumed_at) if rank == 0 else contextlib.nullcontext()
    with tensorboard as writer:
        def on_step(step: int, log: dict) -> None:
            if writer is not None and (step % args.log_every == 0 or step == train_config.steps):
                for key, value in log.items():
                    writer.add_scalar(f"train/{key}", value, step)
        _, _, logs = train(model_config, data.batch, cfg.task, train_config, out_dir=run, on_step=on_step)
    summary = {"steps": train_config.steps, "steps_run": len(logs),
               "final": {k: float(np.mean([r[k] for r in logs[-20:]])) for k in logs[-1]} if logs else {}}
    if rank > 0:
        return summary
    print(f"trained {len(logs)} steps -> {run / CHECKPOINT}: {summary['final']}")
    if args.calibrate:
        summary["calibration"] = cmd_calibrate(cfg)
    return summary


def settings(cfg: Configs) -> dict:
    """Every setting of the command as one flat mapping: the keys of its YAML file, and the shape read from the data."""
    return {**asdict(cfg.args), **{k: v for k, v in asdict(cfg.model).items() if k != "umask"},
            **asdict(cfg.model.umask), **asdict(cfg.task), **asdict(cfg.train)}


def _evidence(args: CompleteArguments, path: Path) -> str:
    """`auto`: U-MASK for a checkpoint trained with it, the whole available region for a fixed-mask one."""
    if args.evidence != "auto":
        return args.evidence
    _, train_config, _ = checkpoint_configs(path)
    return "available" if train_config is not None and train_config.mask != "umask" else "umask"


def calibration_path(engine_dir: str | Path, data_name: str) -> Path:
    """Where ``calibrate`` writes an engine's calibration to one data file (evaluate, predict and
    ``recipes/compare.py`` apply it)."""
    return Path(engine_dir) / f"calibration_{data_name}.json"


def _calibration_path(args: CompleteArguments) -> Path:
    return calibration_path(args.output_dir, args.data_name)


def _model_and_split(cfg: Configs, split: str, calibrated: bool = True):
    """The checkpoint's model, adapted to the data's step length and (when `calibrated` and it
    exists) to its calibration file, and one split of the data."""
    args = cfg.args
    path = Path(args.output_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint; run `complete.py train` with this output_dir first")
    model_config, _, _ = checkpoint_configs(path)
    data = load_split(cfg, split, model_config.cell_dim, path.parent)
    model = load_model(path).to(cfg.train.device)
    model.set_slots_per_day(data.slots_per_day)
    if calibrated and _calibration_path(args).exists():
        model.load_calibration(json.loads(_calibration_path(args).read_text()))
    return path, model, data


def cmd_calibrate(cfg: Configs) -> dict:
    """On the val split of the configured data: the residual's weight per task, and the samples'
    spread per task and channel so the 90% interval covers 90% of the targets; written to
    `output_dir/calibration_<data>.json`, which evaluate and predict apply to that data. Run it with
    another city's file to adapt a checkpoint to that city without training."""
    args = cfg.args
    _threads(args)
    path, model, data = _model_and_split(cfg, "val", calibrated=False)
    result = calibrate(model, data.batch[:args.max_entities or len(data.batch)], tuple(args.eval_tasks),
                       cfg.task, _evidence(args, path), args.n_samples, args.sampler_steps, cfg.train.seed)
    write_json(_calibration_path(args), model.calibration())
    print(f"calibrated on {args.data_name}/val -> {_calibration_path(args)}: {result}")
    return result


def _completions(cfg: Configs):
    """Load the model and split, and return (model, data, [(task name, regions, samples, point)])."""
    args = cfg.args
    _threads(args)
    path, model, data = _model_and_split(cfg, args.split)
    if args.max_entities:
        data.batch = data.batch[:args.max_entities]
        data.user_id = None if data.user_id is None else data.user_id[:args.max_entities]
    evidence = _evidence(args, path)
    results = []
    for name in args.eval_tasks:
        task, regions = task_regions(data.batch, name, cfg.task, cfg.train.seed)
        samples, point = complete_chunked(model, data.batch, task, regions, evidence, args.n_samples,
                                          args.sampler_steps, cfg.train.seed)
        results.append((name, regions, samples, point))
    return model, data, evidence, results


def cmd_evaluate(cfg: Configs) -> dict:
    args = cfg.args
    model, data, evidence, results = _completions(cfg)
    report = {}
    for name, regions, samples, point in results:
        report[name] = completion_report(samples, data.batch.x, regions.target, data.inverse, point=point)
        if any(c.startswith("app:") for c in data.channels):
            report[name]["recommendation"] = recommendation_report(
                point, data.batch.x, regions.target, app_channels(data.channels), data.inverse)
        print(f"{args.data_name}/{args.split}/{name}: " + ", ".join(
            f"{k} {np.round(v, 4).tolist()}" for k, v in report[name].items()
            if k in ("rmse", "mae", "rmse_orig", "mae_orig", "coverage90")))
    run = Path(args.output_dir)
    write_json(run / f"eval_{args.data_name}_{args.split}.json",
               {"data": args.data_path, "split": args.split, "evidence": evidence, "channels": data.channels,
                "tasks": report})
    if args.figures:
        outputs = umask_outputs(model.cpu(), data.batch, tuple(args.eval_tasks), cfg.task)
        prefix = f"{args.data_name}_{args.split}"
        mask_figure({t: o for t, (o, _) in outputs.items()}, run / "figures" / f"masks_{prefix}.png")
        out, regions = outputs[args.eval_tasks[-1]]
        pattern_figure(out, regions.available, run / "figures" / f"fpat_{prefix}.png")
    return report


def cmd_predict(cfg: Configs) -> dict:
    args = cfg.args
    _, data, evidence, results = _completions(cfg)
    tensors = {}
    for name, regions, samples, point in results:
        lo, hi = prediction_interval(samples, 0.9)
        tensors |= {f"{name}.mean": data.inverse(point), f"{name}.lower": data.inverse(lo),
                    f"{name}.upper": data.inverse(hi), f"{name}.target": regions.target.to(torch.uint8),
                    f"{name}.available": regions.available.to(torch.uint8)}
        if any(c.startswith("app:") for c in data.channels):
            scores = engagement(tensors[f"{name}.mean"], regions.target, app_channels(data.channels))
            tensors[f"{name}.app_ranking"] = scores.argsort(dim=1, descending=True, stable=True)
    if data.user_id is not None:
        tensors["user_id"] = torch.from_numpy(data.user_id.astype(np.int64))
    path = Path(args.output_dir) / f"predictions_{args.data_name}_{args.split}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"channels": json.dumps(data.channels), "evidence": evidence})
    print(f"wrote {len(data.batch)} entities x {len(results)} tasks -> {path}")
    return {"path": str(path), "entities": len(data.batch)}


def parse(argv: list[str]) -> Configs:
    """``--config CONFIG.yaml [--key value ...]`` -> the recipe's arguments and the library's configs."""
    args, model, umask, task, train_config = parse_config(
        (CompleteArguments, ModelConfig, UMaskConfig, TaskConfig, TrainConfig), argv)
    return Configs(args, replace(model, umask=umask), task, train_config)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: complete.py {{{','.join(COMMANDS)}}} --config CONFIG.yaml [--key value ...]")
    cfg = parse(argv[1:])
    _threads(cfg.args)
    return {"train": cmd_train, "calibrate": cmd_calibrate, "evaluate": cmd_evaluate,
            "predict": cmd_predict}[argv[0]](cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(main))
