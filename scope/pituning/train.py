"""PITuning's training loop: one optimisation stage (population tuning, distillation, from-scratch
training) with warm-up + cosine schedule, atomic resumable checkpoints, and batched prediction."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from scope.io import load_checkpoint, save_checkpoint
from scope.pituning.data import IntentSamples
from scope.pituning.losses import LossFn
from scope.pituning.model import IntentPredictor


@dataclass
class StageConfig:
    """One optimisation stage (population tuning, distillation, from-scratch training)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3                  # new modules (embeddings, IAT, head)
    lm_lr: float = 1e-4               # pretrained LM blocks
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self):
        small = {k: getattr(self, k) for k in ("batch_size", "checkpoint_every", "eval_every") if getattr(self, k) < 1}
        if small or self.steps < 0 or self.lr <= 0:
            raise ValueError(f"batch_size, checkpoint_every and eval_every must be >= 1, steps >= 0 and lr > 0; "
                             f"got {small or {'steps': self.steps, 'lr': self.lr}}")


def _optimizer(model: IntentPredictor, cfg: StageConfig, pretrained: bool) -> torch.optim.Optimizer:
    lm = [p for p in model.lm.parameters() if p.requires_grad]
    lm_ids = {id(p) for p in lm}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in lm_ids]
    return torch.optim.AdamW([{"params": lm, "lr": cfg.lm_lr if pretrained else cfg.lr}, {"params": rest, "lr": cfg.lr}],
                             weight_decay=cfg.weight_decay)


def _lr_factor(step: int, cfg: StageConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


RESUMABLE_CHANGES = ("steps", "checkpoint_every", "eval_every")  # may differ between a checkpoint and its resume


def fit(model: IntentPredictor, loss_fn: LossFn, data: IntentSamples, cfg: StageConfig, *,
        pretrained: bool = False, checkpoint: str | Path | None = None, desc: str = "train",
        progress: bool = True, log: Callable[[int, dict[str, float]], None] | None = None,
        evaluate: Callable[[IntentPredictor], dict[str, float]] | None = None) -> list[dict[str, float]]:
    """Minimise ``loss_fn`` on random batches of ``data`` for ``cfg.steps`` steps.

    Resumes from ``checkpoint`` when it exists (model, optimiser, RNG, step) and writes it every
    ``checkpoint_every`` steps and at the end; ``log(step, scalars)`` receives the losses (e.g. for
    TensorBoard) and ``evaluate(model)`` scores, every ``eval_every`` steps.
    """
    optimizer = _optimizer(model, cfg, pretrained)
    device = _device(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # the schedule's base rates, before a checkpoint's
    start = 0
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    if checkpoint is not None and Path(checkpoint).exists():
        start, saved = load_checkpoint(checkpoint, {"model": model}, optimizer, generator)
        saved = json.loads(saved.get("stage_config", "{}"))
        changed = [f"{k}: {saved[k]!r} in the checkpoint, {v!r} now" for k, v in settings.items()
                   if k in saved and saved[k] != v]
        if changed:
            raise ValueError(f"{checkpoint}: cannot resume with other settings ({'; '.join(changed)}); use the "
                             "checkpoint's settings, or another output folder to train afresh")
    history = []
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, disable=not progress)
    for step in bar:
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * _lr_factor(step, cfg)
        rows = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        loss, scalars = loss_fn(model, data[rows].to(device), generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}, step {step + 1}: the loss is {loss.item()} (non-finite); stopped before "
                                     f"the update, {checkpoint or 'no checkpoint'} keeps the last good state")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scalars = {"loss": loss.item(), **scalars}
        done = step + 1
        if evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            scalars |= evaluate(model)
            model.train()
        history.append(scalars)
        bar.set_postfix(loss=f"{scalars['loss']:.3f}")
        if log is not None:
            log(done, scalars)
        if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(checkpoint, {"model": model}, optimizer, generator, done,
                            {"stage_config": json.dumps(settings)})
    model.eval()
    return history


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def with_teacher_logits(teacher: IntentPredictor, samples: IntentSamples, n: int | None, seed: int = 0) -> IntentSamples:
    """A random subset of ``n`` samples (all if None) carrying the teacher's logits.

    Decision (CPU budget): the teacher's forward pass costs ~10x the student's training step, so
    the default CPU recipe scores a fixed subset once and distils over it for several epochs;
    ``n = None`` with on-the-fly logits is the paper-scale setting.
    """
    if n is not None and n < len(samples):
        samples = samples[torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:n]]
    return samples.with_teacher_logits(predict(teacher, samples))


@torch.no_grad()
def predict(model: IntentPredictor, samples: IntentSamples, batch_size: int = 512) -> Tensor:
    """Logits [N, N_I] in eval mode (on the CPU, whatever the model's device)."""
    model.eval()
    device = _device(model)
    out = [model(samples[i:i + batch_size].inputs(device)).cpu() for i in range(0, len(samples), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.n_intents)
