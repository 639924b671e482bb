"""Train, calibrate, evaluate and apply the completion engine (U-MASK + DiT over a prior) on a
UoMo-format city file or on per-user tensors.

    python recipes/complete.py train     --config recipes/configs/complete_nj.yaml [--steps 4000 ...]
    python recipes/complete.py calibrate --config recipes/configs/complete_nj.yaml
    python recipes/complete.py evaluate  --config recipes/configs/complete_nj.yaml [--split test]
    python recipes/complete.py predict   --config recipes/configs/complete_nj.yaml [--split test]

train resumes from `run_dir/checkpoint.safetensors` when it exists, logs to TensorBoard
(`run_dir/tb`) and, with `calibrate: true`, ends by calibrating the residual's weight and the
samples' spread on the val split (what `calibrate` does alone). calibrate writes `run_dir/calibration_<data>.json`; evaluate writes
`run_dir/eval_<data>_<split>.json` (+ Fig. 8/9
PNGs under `run_dir/figures`); predict writes `run_dir/predictions_<data>_<split>.safetensors`
(point estimate and 90% interval in original units, target and evidence masks, per task;
app-category rankings on per-user tensors). `<data>` is the data file's or folder's name, so one
checkpoint evaluated on several files never overwrites a result.

A checkpoint applied to other data (another city, another step length) keeps its weights: the
slots per day of the data (from its timestamps) retune the calendar and the prior, the data's
own train split gives its normalisation, and a POI width other than the checkpoint's is refused
unless `pad_poi: true`. `evidence: auto` evaluates with the mask the checkpoint was trained with
(U-MASK, or the whole available region for a fixed-mask control).
"""

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from trl import TrlParser

from completion.city import load_city
from completion.batch import Batch
from completion.evaluate import (EVIDENCE, calibrate, choose_prior, complete_chunked, task_regions,
                                 umask_outputs)
from completion.figures import mask_figure, pattern_figure
from completion.metrics import completion_report, prediction_interval
from completion.model import OBJECTIVES, ModelConfig
from completion.priors import PRIORS
from completion.recommend import app_channels, engagement, recommendation_report
from completion.tasks import TASKS, TaskConfig
from completion.tensors import BehaviourTensors
from completion.train import CHECKPOINT, TrainConfig, checkpoint_configs, load_model, train
from completion.users import load_embeddings, user_batch
from scope.io import atomic_path, write_json

COMMANDS = ("train", "calibrate", "evaluate", "predict")


@dataclass
class CompleteArguments:
    # data
    data: str = "city"  # city (a UoMo-format .npz, e.g. NJ) | tensors (a recipes/tensorize.py output folder)
    data_path: str = "../shared/data/uomo-nj/nj_traffic_users_64.npz"
    slots_per_day: int = 0  # 0 = from the data's timestamps; a value that disagrees with them is an error
    pad_poi: bool = False  # city data with fewer POI categories than the checkpoint: zero-fill the missing ones
    embeddings: str | None = None  # per-user h_u (.npz/.safetensors: user_id, embedding); tensors only
    run_dir: str = "runs/complete/nj"
    max_entities: int = 0  # evaluate/predict on the first N entities of the split (0 = all)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # model (completion.model.ModelConfig)
    preset: str = "tiny"
    patch_size: list[int] = field(default_factory=lambda: [4, 2, 2])
    diffusion_steps: int = 1000
    center: bool = True
    entity_conditioning: bool = True
    calendar: bool = True
    prior: str = "carry"
    prior_damping: float = 0.97
    prior_seasonal: bool = True
    prior_damping_grid: list[float] = field(default_factory=list)  # non-empty: choose prior_damping on val among these
    prior_shrinkage: float = 0.0  # evidence means shrunk toward the train mean by this many pseudo-entries
    prior_shrinkage_grid: list[float] = field(default_factory=list)  # non-empty: choose prior_shrinkage on val too
    umask_d: int = 64
    umask_groups: int = 8
    umask_bank_size: int = 512
    rho_init: float = 0.9
    recency_init: float = 3.0
    # tasks (completion.tasks.TaskConfig)
    short_horizon: int = 4
    long_horizon: int = 32
    cold_revealed: int = 4
    cold_hidden_channels: list[int] = field(default_factory=list)
    cold_hidden_cells: float = 0.0
    # training (completion.train.TrainConfig)
    tasks: list[str] = field(default_factory=lambda: ["short", "long"])
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lambda_con: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    mask: str = "umask"  # umask | random | tube | temporal (fixed-mask control)
    mask_ratio: float = 0.81
    mask_lr_scale: float = 1.0  # U-MASK's learning rate relative to lr
    objective: str = "diffusion"  # diffusion | regression (the deterministic control)
    history_dropout: list[float] = field(default_factory=list)  # shares of history dropped at random in training
    dropout_share: float = 0.25  # the share of training entities that drop history at all
    dropout_block_slots: int = 4
    seed: int = 0
    device: str = "cpu"
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
        if self.data not in ("city", "tensors"):
            raise ValueError(f"unknown data {self.data!r}; expected 'city' or 'tensors'")
        for name in ("tasks", "eval_tasks"):
            unknown = set(getattr(self, name)) - set(TASKS)
            if unknown:
                raise ValueError(f"{name}: unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
        if self.evidence not in ("auto", *EVIDENCE):
            raise ValueError(f"unknown evidence {self.evidence!r}; expected 'auto' or one of {EVIDENCE}")
        if self.prior not in PRIORS or self.objective not in OBJECTIVES:
            raise ValueError(f"prior must be one of {PRIORS} and objective one of {OBJECTIVES}; "
                             f"got {self.prior!r} and {self.objective!r}")

    @property
    def task_config(self) -> TaskConfig:
        return TaskConfig(self.short_horizon, self.long_horizon, self.cold_revealed,
                          tuple(self.cold_hidden_channels), self.cold_hidden_cells)

    @property
    def data_name(self) -> str:
        """The data file's (or folder's) name, which result files are named by."""
        path = Path(self.data_path)
        return path.stem if self.data == "city" else path.name


@dataclass
class Data:
    batch: Batch
    inverse: Callable[[Tensor], Tensor]  # normalised [..., C, T, H, W] -> original units
    channels: list[str]
    slots_per_day: int
    user_id: np.ndarray | None = None


def load_split(args: CompleteArguments, split: str, model_config: ModelConfig | None = None) -> Data:
    """One split of the configured data; `model_config` (of a checkpoint) checks the POI width."""
    if args.data == "city":
        city = load_city(args.data_path, args.slots_per_day, None if model_config is None else model_config.cell_dim,
                         args.pad_poi)
        if split not in city.batches:
            raise ValueError(f"{args.data_path}: unknown split {split!r}; expected one of {sorted(city.batches)}")
        channels = ["traffic", "users"] if city.raw[split].shape[1] == 2 else \
            [f"channel_{c}" for c in range(city.raw[split].shape[1])]
        return Data(city.batches[split], city.inverse, channels, city.slots_per_day)
    tensors = BehaviourTensors(args.data_path, split)
    embeddings = load_embeddings(args.embeddings) if args.embeddings else None
    batch, users = user_batch(tensors, embeddings)

    def inverse(z):
        return tensors.normalizer.inverse_transform(z, channel_axis=z.dim() - 4)
    spd = 1440 // tensors.meta["config"]["slot_minutes"]
    if args.slots_per_day and args.slots_per_day != spd:
        raise ValueError(f"{args.data_path}: the tensors have {spd} slots per day, the configuration says "
                         f"{args.slots_per_day}")
    return Data(batch, inverse, tensors.channels, spd, users)


def _threads(args: CompleteArguments) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_train(args: CompleteArguments) -> dict:
    data = load_split(args, "train")
    _, C, T, H, W = data.batch.x.shape
    if args.prior_damping_grid or args.prior_shrinkage_grid:
        val = load_split(args, "val").batch
        args.prior_damping, args.prior_shrinkage, scores = choose_prior(
            data.batch, val, tuple(args.tasks), args.task_config, data.slots_per_day, args.prior_seasonal, args.center,
            tuple(args.prior_damping_grid or [args.prior_damping]),
            tuple(args.prior_shrinkage_grid or [args.prior_shrinkage]))
        print(f"prior_damping {args.prior_damping}, prior_shrinkage {args.prior_shrinkage} chosen on val "
              f"(RMSE of the prior alone, damping/shrinkage: {scores})")
    model_config = ModelConfig(
        channels=C, T=T, cell_dim=data.batch.cells.shape[-1], entity_dim=data.batch.entity.shape[-1],
        preset=args.preset, patch_size=tuple(args.patch_size), slots_per_day=data.slots_per_day,
        diffusion_steps=args.diffusion_steps, center=args.center, entity_conditioning=args.entity_conditioning,
        calendar=args.calendar, prior=args.prior, prior_damping=args.prior_damping,
        prior_seasonal=args.prior_seasonal, prior_shrinkage=args.prior_shrinkage,
        umask=dict(d=args.umask_d, groups=args.umask_groups, bank_size=args.umask_bank_size,
                   rho_init=args.rho_init, recency_init=args.recency_init))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         lambda_con=args.lambda_con, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, tasks=tuple(args.tasks),
                         device=args.device, mask=args.mask, mask_ratio=args.mask_ratio,
                         mask_lr_scale=args.mask_lr_scale, objective=args.objective,
                         history_dropout=tuple(args.history_dropout), dropout_share=args.dropout_share,
                         dropout_block_slots=args.dropout_block_slots)
    run = Path(args.run_dir)
    write_json(run / "args.json", asdict(args))
    with SummaryWriter(str(run / "tb")) as writer:
        def on_step(step: int, log: dict) -> None:
            if step % args.log_every == 0 or step == args.steps:
                for key, value in log.items():
                    writer.add_scalar(f"train/{key}", value, step)
        _, _, logs = train(model_config, data.batch, args.task_config, config, out_dir=run, on_step=on_step)
    summary = {"steps": args.steps, "steps_run": len(logs),
               "final": {k: float(np.mean([r[k] for r in logs[-20:]])) for k in logs[-1]} if logs else {}}
    print(f"trained {len(logs)} steps -> {run / CHECKPOINT}: {summary['final']}")
    if args.calibrate:
        summary["calibration"] = cmd_calibrate(args)
    return summary


def _evidence(args: CompleteArguments, path: Path) -> str:
    """`auto`: U-MASK for a checkpoint trained with it, the whole available region for a fixed-mask one."""
    if args.evidence != "auto":
        return args.evidence
    _, train_config, _ = checkpoint_configs(path)
    return "available" if train_config is not None and train_config.mask != "umask" else "umask"


def _calibration_path(args: CompleteArguments) -> Path:
    return Path(args.run_dir) / f"calibration_{args.data_name}.json"


def _model_and_split(args: CompleteArguments, split: str, calibrated: bool = True):
    """The checkpoint's model, adapted to the data's step length and (when `calibrated` and it
    exists) to its calibration file, and one split of the data."""
    path = Path(args.run_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint; run `complete.py train` with this run_dir first")
    model_config, _, _ = checkpoint_configs(path)
    data = load_split(args, split, model_config)
    model = load_model(path).to(args.device)
    model.set_slots_per_day(data.slots_per_day)
    if calibrated and _calibration_path(args).exists():
        model.load_calibration(json.loads(_calibration_path(args).read_text()))
    return path, model, data


def cmd_calibrate(args: CompleteArguments) -> dict:
    """On the val split of the configured data: the residual's weight per task, and the samples'
    spread per task and channel so the 90% interval covers 90% of the targets; written to
    `run_dir/calibration_<data>.json`, which evaluate and predict apply to that data. Run it with
    another city's file to adapt a checkpoint to that city without training."""
    _threads(args)
    path, model, data = _model_and_split(args, "val", calibrated=False)
    result = calibrate(model, data.batch[:args.max_entities or len(data.batch)], tuple(args.eval_tasks),
                       args.task_config, _evidence(args, path), args.n_samples, args.sampler_steps, args.seed)
    write_json(_calibration_path(args), model.calibration())
    print(f"calibrated on {args.data_name}/val -> {_calibration_path(args)}: {result}")
    return result


def _completions(args: CompleteArguments):
    """Load the model and split, and return (model, data, [(task name, regions, samples, point)])."""
    _threads(args)
    path, model, data = _model_and_split(args, args.split)
    if args.max_entities:
        data.batch = data.batch[:args.max_entities]
        data.user_id = None if data.user_id is None else data.user_id[:args.max_entities]
    evidence = _evidence(args, path)
    results = []
    for name in args.eval_tasks:
        task, regions = task_regions(data.batch, name, args.task_config, args.seed)
        samples, point = complete_chunked(model, data.batch, task, regions, evidence, args.n_samples,
                                          args.sampler_steps, args.seed)
        results.append((name, regions, samples, point))
    return model, data, evidence, results


def cmd_evaluate(args: CompleteArguments) -> dict:
    model, data, evidence, results = _completions(args)
    report = {}
    for name, regions, samples, point in results:
        report[name] = completion_report(samples, data.batch.x, regions.target, data.inverse, point=point)
        if any(c.startswith("app:") for c in data.channels):
            report[name]["recommendation"] = recommendation_report(
                point, data.batch.x, regions.target, app_channels(data.channels), data.inverse)
        print(f"{args.data_name}/{args.split}/{name}: " + ", ".join(
            f"{k} {np.round(v, 4).tolist()}" for k, v in report[name].items()
            if k in ("rmse", "mae", "rmse_orig", "mae_orig", "coverage90")))
    run = Path(args.run_dir)
    write_json(run / f"eval_{args.data_name}_{args.split}.json",
               {"data": args.data_path, "split": args.split, "evidence": evidence, "channels": data.channels,
                "tasks": report})
    if args.figures:
        outputs = umask_outputs(model.cpu(), data.batch, tuple(args.eval_tasks), args.task_config)
        prefix = f"{args.data_name}_{args.split}"
        mask_figure({t: o for t, (o, _) in outputs.items()}, run / "figures" / f"masks_{prefix}.png")
        out, regions = outputs[args.eval_tasks[-1]]
        pattern_figure(out, regions.available, run / "figures" / f"fpat_{prefix}.png")
    return report


def cmd_predict(args: CompleteArguments) -> dict:
    _, data, evidence, results = _completions(args)
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
    path = Path(args.run_dir) / f"predictions_{args.data_name}_{args.split}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"channels": json.dumps(data.channels), "evidence": evidence})
    print(f"wrote {len(data.batch)} entities x {len(results)} tasks -> {path}")
    return {"path": str(path), "entities": len(data.batch)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: complete.py {{{','.join(COMMANDS)}}} --config CONFIG.yaml [--key value ...]")
    (args,) = TrlParser((CompleteArguments,)).parse_args_and_config(argv[1:])
    _threads(args)
    return {"train": cmd_train, "calibrate": cmd_calibrate, "evaluate": cmd_evaluate,
            "predict": cmd_predict}[argv[0]](args)


if __name__ == "__main__":
    main()
