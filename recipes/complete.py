"""Train, evaluate and apply the completion engine (U-MASK + DiT) on NJ or on per-user tensors.

    python recipes/complete.py train    --config recipes/configs/complete_nj.yaml [--steps 4000 ...]
    python recipes/complete.py evaluate --config recipes/configs/complete_nj.yaml [--split test]
    python recipes/complete.py predict  --config recipes/configs/complete_nj.yaml [--split test]

train resumes from `run_dir/checkpoint.safetensors` when it exists and logs to TensorBoard
(`run_dir/tb`); evaluate writes `run_dir/eval_<split>.json` (+ Fig. 8/9 PNGs under
`run_dir/figures`); predict writes `run_dir/predictions_<split>.safetensors` (mean and 90%
interval in original units, target and evidence masks, per task; app-category rankings on
per-user tensors).
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

from completion.data import Batch
from completion.evaluate import sample_chunked, task_regions, umask_outputs
from completion.figures import mask_figure, pattern_figure
from completion.metrics import completion_report, prediction_interval
from completion.model import ModelConfig
from completion.nj import load_nj
from completion.recommend import app_channels, engagement, recommendation_report
from completion.tasks import TASKS, TaskConfig
from completion.tensors import BehaviourTensors
from completion.train import CHECKPOINT, TrainConfig, load_model, train
from completion.users import load_embeddings, user_batch
from scope.io import atomic_path, write_json

COMMANDS = ("train", "evaluate", "predict")


@dataclass
class CompleteArguments:
    # data
    data: str = "nj"  # nj (the real city npz) | tensors (a recipes/tensorize.py output folder)
    data_path: str = "../shared/data/uomo-nj/nj_traffic_users_64.npz"
    embeddings: str | None = None  # per-user h_u (.npz/.safetensors: user_id, embedding); tensors only
    run_dir: str = "runs/complete/nj"
    max_entities: int = 0  # evaluate/predict on the first N entities of the split (0 = all)
    # model (completion.model.ModelConfig)
    preset: str = "tiny"
    patch_size: list[int] = field(default_factory=lambda: [4, 2, 2])
    diffusion_steps: int = 1000
    center: bool = True
    entity_conditioning: bool = True
    umask_d: int = 64
    umask_groups: int = 8
    umask_bank_size: int = 512
    rho_init: float = 0.9
    # tasks (completion.tasks.TaskConfig)
    short_horizon: int = 4
    long_horizon: int = 32
    cold_revealed: int = 4
    cold_hidden_channels: list[int] = field(default_factory=list)
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
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    # evaluation / prediction
    split: str = "test"
    eval_tasks: list[str] = field(default_factory=lambda: ["short", "long"])
    evidence: str = "umask"  # umask | available (the whole available region)
    n_samples: int = 8
    sampler_steps: int = 20
    figures: bool = True

    def __post_init__(self):
        if self.data not in ("nj", "tensors"):
            raise ValueError(f"unknown data {self.data!r}; expected 'nj' or 'tensors'")
        for name in ("tasks", "eval_tasks"):
            unknown = set(getattr(self, name)) - set(TASKS)
            if unknown:
                raise ValueError(f"{name}: unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")

    @property
    def task_config(self) -> TaskConfig:
        return TaskConfig(self.short_horizon, self.long_horizon, self.cold_revealed,
                          tuple(self.cold_hidden_channels))


@dataclass
class Data:
    batch: Batch
    inverse: Callable[[Tensor], Tensor]  # normalised [..., C, T, H, W] -> original units
    channels: list[str]
    slots_per_day: int
    user_id: np.ndarray | None = None


def load_split(args: CompleteArguments, split: str) -> Data:
    if args.data == "nj":
        nj = load_nj(args.data_path)
        if split not in nj.batches:
            raise ValueError(f"unknown NJ split {split!r}; expected one of {sorted(nj.batches)}")
        return Data(nj.batches[split], nj.inverse, ["traffic", "users"], 96)
    tensors = BehaviourTensors(args.data_path, split)
    embeddings = load_embeddings(args.embeddings) if args.embeddings else None
    batch, users = user_batch(tensors, embeddings)

    def inverse(z):
        return tensors.normalizer.inverse_transform(z, channel_axis=z.dim() - 4)
    return Data(batch, inverse, tensors.channels, 1440 // tensors.meta["config"]["slot_minutes"], users)


def cmd_train(args: CompleteArguments) -> dict:
    data = load_split(args, "train")
    _, C, T, H, W = data.batch.x.shape
    model_config = ModelConfig(
        channels=C, T=T, cell_dim=data.batch.cells.shape[-1], entity_dim=data.batch.entity.shape[-1],
        preset=args.preset, patch_size=tuple(args.patch_size), slots_per_day=data.slots_per_day,
        diffusion_steps=args.diffusion_steps, center=args.center, entity_conditioning=args.entity_conditioning,
        umask=dict(d=args.umask_d, groups=args.umask_groups, bank_size=args.umask_bank_size,
                   rho_init=args.rho_init))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         lambda_con=args.lambda_con, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, tasks=tuple(args.tasks),
                         device=args.device, mask=args.mask, mask_ratio=args.mask_ratio,
                         mask_lr_scale=args.mask_lr_scale)
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
    return summary


def _completions(args: CompleteArguments):
    """Load the model and split, and yield (task name, regions, samples) per evaluation task."""
    model = load_model(Path(args.run_dir) / CHECKPOINT).to(args.device)
    data = load_split(args, args.split)
    if args.max_entities:
        data.batch = data.batch[:args.max_entities]
        data.user_id = None if data.user_id is None else data.user_id[:args.max_entities]
    results = []
    for name in args.eval_tasks:
        task, regions = task_regions(data.batch, name, args.task_config, args.seed)
        samples = sample_chunked(model, data.batch, task, regions, args.evidence, args.n_samples,
                                 args.sampler_steps, args.seed)
        results.append((name, regions, samples))
    return model, data, results


def cmd_evaluate(args: CompleteArguments) -> dict:
    model, data, results = _completions(args)
    report = {}
    for name, regions, samples in results:
        report[name] = completion_report(samples, data.batch.x, regions.target, data.inverse)
        if any(c.startswith("app:") for c in data.channels):
            report[name]["recommendation"] = recommendation_report(
                samples.mean(0), data.batch.x, regions.target, app_channels(data.channels), data.inverse)
        print(f"{args.split}/{name}: " + ", ".join(f"{k} {np.round(v, 4).tolist()}" for k, v in report[name].items()
                                                    if k in ("rmse", "mae", "rmse_orig", "mae_orig")))
    run = Path(args.run_dir)
    write_json(run / f"eval_{args.split}.json", {"split": args.split, "evidence": args.evidence,
                                                 "channels": data.channels, "tasks": report})
    if args.figures:
        outputs = umask_outputs(model.cpu(), data.batch, tuple(args.eval_tasks), args.task_config)
        mask_figure({t: o for t, (o, _) in outputs.items()}, run / "figures" / f"masks_{args.split}.png")
        out, regions = outputs[args.eval_tasks[-1]]
        pattern_figure(out, regions.available, run / "figures" / f"fpat_{args.split}.png")
    return report


def cmd_predict(args: CompleteArguments) -> dict:
    _, data, results = _completions(args)
    tensors = {}
    for name, regions, samples in results:
        lo, hi = prediction_interval(samples, 0.9)
        tensors |= {f"{name}.mean": data.inverse(samples.mean(0)), f"{name}.lower": data.inverse(lo),
                    f"{name}.upper": data.inverse(hi), f"{name}.target": regions.target.to(torch.uint8),
                    f"{name}.available": regions.available.to(torch.uint8)}
        if any(c.startswith("app:") for c in data.channels):
            scores = engagement(tensors[f"{name}.mean"], regions.target, app_channels(data.channels))
            tensors[f"{name}.app_ranking"] = scores.argsort(dim=1, descending=True, stable=True)
    if data.user_id is not None:
        tensors["user_id"] = torch.from_numpy(data.user_id.astype(np.int64))
    path = Path(args.run_dir) / f"predictions_{args.split}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"channels": json.dumps(data.channels), "evidence": args.evidence})
    print(f"wrote {len(data.batch)} entities x {len(results)} tasks -> {path}")
    return {"path": str(path), "entities": len(data.batch)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: complete.py {{{','.join(COMMANDS)}}} --config CONFIG.yaml [--key value ...]")
    (args,) = TrlParser((CompleteArguments,)).parse_args_and_config(argv[1:])
    return {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict}[argv[0]](args)


if __name__ == "__main__":
    main()
