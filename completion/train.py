"""Algorithm 1: joint training of the U-MASK generator, the entity MLP and the DiT.

Each step draws a batch of entities and one task per entity, builds the task regions, lets
U-MASK choose the evidence, and minimises (Eq. 20)

    L = L_rec + lambda_con * InfoNCE(F_short, F_long)

with L_rec the X_0 error on target entries (Eq. 19). An EMA copy of the weights is kept for
evaluation. All randomness after initialisation comes from one generator on the training
device. Before the first step the prior's statistics (slot-of-day profile, residual scale) are
fitted on the training entities (`CompletionModel.fit_statistics`). Checkpoints (model, EMA,
optimiser, RNG state, step, and the configs) are single safetensors files written atomically;
`train` resumes from the checkpoint in `out_dir` when there is one.

``objective: regression`` (one forward pass, plain MSE) is the deterministic control of the
diffusion objective.

Several processes (``torchrun --nproc_per_node N`` or ``accelerate launch``; :func:`distributed`):
data parallel, with ``batch_size`` the global batch. Every rank holds the same generator, so all
draw the same global batch and each trains on its own contiguous share of it, with its own
randomness (seeded per step from the shared generator plus the rank); the gradients are averaged
over the ranks (one all_reduce), so the weights, the optimiser and the EMA stay identical; U-MASK's
bank remembers the whole global batch on every rank; the logged values are means over the ranks.
Rank 0 alone writes checkpoints (the others wait at a barrier), and every rank resumes from it.
The InfoNCE term and U-MASK's in-batch neighbours see the rank's share only. One process trains
exactly as before.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from completion.batch import Batch
from completion.masks import FIXED_MASKS, fixed_mask
from completion.model import OBJECTIVES, CompletionModel, ModelConfig, build_model
from completion.tasks import DROP_KINDS, TASKS, TaskConfig, drop_history, make_regions, task_index
from scope import io

CHECKPOINT = "checkpoint.safetensors"
CALIBRATION_BUFFERS = {"residual_weight", "spread"}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    lambda_con: float = 0.1
    con_temperature: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    device: str = "cpu"
    mask: str = "umask"  # or a conventional fixed mask (random, tube, temporal): the Table 9 control
    mask_ratio: float = 0.81  # budget of a fixed mask, k_b = floor(mask_ratio * N_b)
    mask_lr_scale: float = 1.0  # learning rate of U-MASK's parameters relative to `lr`
    objective: str = "diffusion"  # or "regression": one forward pass, plain MSE (the deterministic control)
    history_dropout: tuple[float, ...] = ()  # shares of history an entity may drop (one drawn per entity)
    dropout_share: float = 0.25  # the share of training entities that drop history at all
    dropout_block_slots: int = 4  # block length of the blockwise history dropout (an hour of 15-minute slots)

    def __post_init__(self):
        if isinstance(self.tasks, str) or isinstance(self.history_dropout, str):
            raise ValueError(f"tasks and history_dropout are lists, got {self.tasks!r} and {self.history_dropout!r}")
        small = {k: getattr(self, k) for k in ("steps", "batch_size", "checkpoint_every") if getattr(self, k) < 1}
        if small or self.lr <= 0:
            raise ValueError(f"steps, batch_size and checkpoint_every must be >= 1 and lr > 0, got {small or self.lr}")
        object.__setattr__(self, "tasks", tuple(self.tasks))  # lists from a parser or JSON
        object.__setattr__(self, "history_dropout", tuple(self.history_dropout))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        if any(not 0 <= f < 1 for f in self.history_dropout) or not 0 <= self.dropout_share <= 1:
            raise ValueError(f"history_dropout fractions must be in [0, 1) and dropout_share in [0, 1], got "
                             f"{list(self.history_dropout)} and {self.dropout_share}")
        if self.mask not in ("umask", *FIXED_MASKS):
            raise ValueError(f"unknown mask {self.mask!r}; expected 'umask' or one of {FIXED_MASKS}")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")


def info_nce(anchor: Tensor, positive: Tensor, temperature: float) -> Tensor:
    """InfoNCE over the batch: row b of `positive` is the positive for row b of `anchor`."""
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_step(model: CompletionModel, batch: Batch, task: Tensor, task_config: TaskConfig,
               config: TrainConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """One evaluation of Algorithm 1's objective (no optimiser update).

    With `history_dropout`, a `dropout_share` of the entities first lose one of those shares of
    their history (uniformly or in blocks, `completion.tasks.drop_history`), so one model serves
    every sparsity level; the others keep theirs, which keeps the model at its best without drops. With a
    fixed mask (`config.mask` random / tube / temporal) there is no U-MASK output, so the
    objective is L_rec alone.
    """
    observed = batch.observed
    if config.history_dropout:
        levels = torch.tensor(config.history_dropout, device=observed.device)
        fraction = levels[torch.randint(len(levels), (len(batch),), generator=generator, device=observed.device)]
        fraction = fraction * (torch.rand(len(batch), generator=generator, device=observed.device) < config.dropout_share)
        blockwise = torch.rand(len(batch), generator=generator, device=observed.device) < 0.5
        dropped = [drop_history(observed, task, task_config, fraction, kind, config.dropout_block_slots, generator)
                   for kind in DROP_KINDS]
        observed = torch.where(blockwise[:, None, None, None], dropped[1], dropped[0])
    regions = make_regions(task, observed, batch.x.shape[1], task_config, generator)
    if config.mask != "umask":
        M = fixed_mask(config.mask, regions.available, config.mask_ratio, generator)
        L_rec, _ = model.loss(batch, task, regions, M=M, generator=generator, objective=config.objective)
        return {"loss": L_rec, "L_rec": L_rec, "rho": torch.tensor(config.mask_ratio)}
    L_rec, mask = model.loss(batch, task, regions, generator=generator, objective=config.objective)
    L_con = info_nce(mask.F_short, mask.F_long, config.con_temperature)
    return {"loss": L_rec + config.lambda_con * L_con, "L_rec": L_rec, "L_con": L_con,
            "rho": mask.rho.mean()}


#################################################################################
#                        Several processes (data parallel)                      #
#################################################################################

def distributed(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process. Under a launcher (``WORLD_SIZE`` > 1) the
    process group is initialised on first use, gloo on CPU and nccl on CUDA, unless it already is
    (accelerate's)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank_device(device: str, world: int) -> str:
    """With several processes on CUDA each uses its own GPU (``LOCAL_RANK``)."""
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    return device


def gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` (the same shape on all), concatenated in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(model: nn.Module, world: int) -> None:
    """Replace each gradient by its mean over the ranks (one all_reduce of all of them; a parameter
    without a gradient counts as zero, so every rank reduces the same tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def mean_over_ranks(values: dict[str, Tensor], world: int) -> dict[str, Tensor]:
    """The logged scalars (detached), averaged over the ranks (one all_reduce)."""
    values = {k: v.detach() for k, v in values.items()}
    if world == 1:
        return values
    stacked = torch.stack([v.to(values["loss"].device, torch.float32) for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world).unbind()))


def train(model_config: ModelConfig, data: Batch, task_config: TaskConfig, config: TrainConfig,
          out_dir: str | Path | None = None, progress: bool = True,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          ) -> tuple[CompletionModel, CompletionModel, list[dict[str, float]]]:
    """Train from scratch or resume from `out_dir`; returns (model, EMA model, per-step logs).

    `on_step(step, log)` is called after every optimiser step (e.g. to write TensorBoard scalars),
    on every rank with the same log (means over the ranks).
    """
    rank, world = distributed(config.device)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is the global batch: it must divide among {world} processes")
    device = rank_device(config.device, world)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = build_model(model_config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    others = [p for name, p in model.named_parameters() if not name.startswith("umask.")]
    optimizer = torch.optim.AdamW([{"params": others},
                                   {"params": model.umask.parameters(), "lr": config.lr * config.mask_lr_scale}],
                                  lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device).manual_seed(config.seed)
    start = 0
    path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if path is not None and path.exists():
        check_resume(path, model_config, config, task_config)
        start = load_checkpoint(path, model, ema, optimizer, generator)
    else:
        model.fit_statistics(data, task_config, config.tasks, generator)
        ema.load_state_dict(model.state_dict())
    if world > 1:
        for tensor in [*model.state_dict().values(), *ema.state_dict().values()]:
            dist.broadcast(tensor, 0)  # rank 0's start is every rank's start
        if config.mask == "umask":  # the bank remembers every rank's share of the batch
            remember = model.umask.remember
            model.umask.remember = lambda Z, task: remember(gather(Z), gather(task))
    tasks = torch.tensor([task_index(name) for name in config.tasks], device=device)
    logs = []
    model.train()
    for step in tqdm(range(start, config.steps), initial=start, total=config.steps,
                     disable=not progress or rank > 0, desc="train"):
        rows = torch.randint(len(data), (config.batch_size,), generator=generator, device=device)
        task = tasks[torch.randint(len(tasks), (config.batch_size,), generator=generator, device=device)]
        step_generator = generator
        if world > 1:  # this rank's share of the global batch, and randomness of its own
            rows, task = rows.chunk(world)[rank], task.chunk(world)[rank]
            seed = torch.randint(2**62, (), generator=generator, device=device).item()
            step_generator = torch.Generator(device).manual_seed(seed + rank)
        batch = data[rows.to(data.x.device)].to(device)
        out = train_step(model, batch, task, task_config, config, step_generator)
        logged = mean_over_ranks(out, world)  # the same on every rank, so all stop together
        if not torch.isfinite(logged["loss"]):
            raise FloatingPointError(f"step {step + 1}: the loss is {logged['loss'].item()} (non-finite); stopped "
                                     f"before the update, {path or 'no checkpoint'} keeps the last good state. "
                                     "Check the inputs for extreme values, or lower lr")
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if world > 1:
            average_gradients(model, world)
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        update_ema(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))  # EMA warm-up
        logs.append({k: v.item() for k, v in logged.items()})
        done = step + 1
        if on_step is not None:
            on_step(done, logs[-1])
        if path is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            if rank == 0:
                save_checkpoint(path, model, ema, optimizer, generator, done, model_config, config, task_config)
            if world > 1:
                dist.barrier()  # nobody runs ahead of the checkpoint
    model.umask.__dict__.pop("remember", None)  # the plain module again
    return model, ema.eval(), logs


#################################################################################
#                         Checkpoints (safetensors)                             #
#################################################################################

def save_checkpoint(path: str | Path, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, step: int,
                    model_config: ModelConfig, train_config: TrainConfig | None = None,
                    task_config: TaskConfig | None = None) -> None:
    """Model, EMA, optimiser and RNG state in one atomic checkpoint (:func:`scope.io.save_checkpoint`).
    The model, training and task configs go into the metadata, so evaluation rebuilds the model and
    uses the mask it was trained with."""
    metadata = {"model_config": json.dumps(asdict(model_config))}
    for key, config in (("train_config", train_config), ("task_config", task_config)):
        if config is not None:
            metadata[key] = json.dumps(asdict(config))
    io.save_checkpoint(path, {"model": model, "ema": ema}, optimizer, generator, step, metadata)


def load_checkpoint(path: str | Path, model: nn.Module, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generator: torch.Generator | None = None) -> int:
    """Restore what is given from a checkpoint; returns the step it was saved at."""
    modules = {"model": model} | ({"ema": ema} if ema is not None else {})
    return io.load_checkpoint(path, modules, optimizer, generator)[0]


RESUMABLE_CHANGES = ("steps", "checkpoint_every", "device")  # may differ between a checkpoint and its resume


def check_resume(path: str | Path, model_config: ModelConfig, train_config: TrainConfig,
                 task_config: TaskConfig) -> None:
    """Refuse to resume a checkpoint under other settings than it was trained with (only the
    :data:`RESUMABLE_CHANGES` may differ), naming each difference."""
    saved = checkpoint_configs(path)
    differences = []
    for name, old, new in zip(("model", "train", "task"), saved, (model_config, train_config, task_config)):
        if old is None:
            continue
        old, new = asdict(old), asdict(new)
        differences += [f"{key}: {old[key]!r} in the checkpoint, {new[key]!r} now" for key in old
                        if key in new and old[key] != new[key] and key not in RESUMABLE_CHANGES]
    if differences:
        raise ValueError(f"{path}: cannot resume with other settings ({'; '.join(differences)}); use the "
                         "checkpoint's settings, or another output folder to train afresh")


def load_model(path: str | Path, use_ema: bool = True) -> CompletionModel:
    """Rebuild a trained model (EMA weights by default) from a checkpoint, in eval mode."""
    tensors, metadata = io.read_checkpoint(path)
    model = build_model(checkpoint_configs(path, metadata)[0])
    missing, unexpected = model.load_state_dict(io.checkpoint_section(tensors, "ema" if use_ema else "model"), strict=False)
    if unexpected or set(missing) - CALIBRATION_BUFFERS:
        raise ValueError(f"{path}: the weights do not match the model config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model.eval()  # a checkpoint saved before calibration existed reads as uncalibrated


def checkpoint_configs(path: str | Path, metadata: dict[str, str] | None = None
                       ) -> tuple[ModelConfig, TrainConfig | None, TaskConfig | None]:
    """The model, training and task configs stored with a checkpoint (None where an older
    checkpoint has none)."""
    if metadata is None:
        metadata = io.checkpoint_metadata(path)
    model = json.loads(metadata["model_config"])
    model.setdefault("parameterization", "x0")  # checkpoints written before the field existed
    train = json.loads(metadata["train_config"]) if "train_config" in metadata else None
    task = json.loads(metadata["task_config"]) if "task_config" in metadata else None
    if train is not None:
        train = TrainConfig(**train)
    if task is not None:
        task = TaskConfig(**task)
    return ModelConfig(**model), train, task
