"""PITuning's training objectives: masked event reconstruction (Eq. 5), distillation (Eq. 6-7), focal loss
(the long-tail ablation), and the per-batch loss functions the training loop minimises."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scope.pituning.data import MASK, N_SPECIAL, IntentSamples
from scope.pituning.model import IntentPredictor


def mask_events(event: Tensor, ratio: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace ``ratio`` of the real history events by ``[MASK]``; targets are -100 elsewhere (Eq. 5)."""
    real = event >= N_SPECIAL
    chosen = (torch.rand(event.shape, generator=generator).to(event.device) < ratio) & real
    return torch.where(chosen, torch.full_like(event, MASK), event), torch.where(chosen, event, torch.full_like(event, -100))


def reconstruction_loss(model: IntentPredictor, H: Tensor, target: Tensor) -> Tensor:
    """Eq. 5: cross-entropy of the masked events, predicted from the backbone states at their positions."""
    if not (target != -100).any():
        return H.sum() * 0.0
    return F.cross_entropy(model.reconstruct(H).flatten(0, 1), target.flatten(), ignore_index=-100)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 0.5,
                      temperature: float = 1.0) -> Tensor:
    """Eq. 6-7: ``alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)``."""
    T = temperature
    soft = F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits / T, -1),
                    log_target=True, reduction="batchmean") * T * T
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss ``-(1 - p_y)^gamma log p_y`` (Lin et al. 2017): the long-tail ablation."""
    logp = F.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    return (-(1 - logp.exp()) ** gamma * logp).mean()


LossFn = Callable[[IntentPredictor, IntentSamples, torch.Generator], tuple[Tensor, dict[str, float]]]


def population_loss(mask_ratio: float = 0.15, mask_weight: float = 0.5) -> LossFn:
    """Population-level objective: ``CE(y) + mu * L_rec`` (Eq. 4-5)."""
    def loss(model: IntentPredictor, batch: IntentSamples, generator: torch.Generator):
        x = batch.inputs()
        x["event"], target = mask_events(x["event"], mask_ratio, generator)
        logits, H = model(x, return_hidden=True)
        ce = F.cross_entropy(logits, batch.intent)
        rec = reconstruction_loss(model, H, target) if mask_weight > 0 else ce * 0.0
        return ce + mask_weight * rec, {"ce": ce.item(), "reconstruction": rec.item()}
    return loss


def supervised_loss(kind: str = "ce", gamma: float = 2.0) -> LossFn:
    """Plain CE (or focal loss) on the labels."""
    def loss(model: IntentPredictor, batch: IntentSamples, generator: torch.Generator):
        logits = model(batch.inputs())
        value = focal_loss(logits, batch.intent, gamma) if kind == "focal" else F.cross_entropy(logits, batch.intent)
        return value, {}
    return loss


def distill_loss(teacher: IntentPredictor | None, alpha: float = 0.5, temperature: float = 1.0) -> LossFn:
    """Eq. 6-7 against the frozen population teacher: its logits cached in ``batch.teacher_logits``
    (see :func:`with_teacher_logits`) or, when absent, computed on the fly."""
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    def loss(model: IntentPredictor, batch: IntentSamples, generator: torch.Generator):
        x = batch.inputs()
        if batch.teacher_logits is not None:
            t = batch.teacher_logits
        else:
            with torch.no_grad():
                t = teacher(x)
        s = model(x)
        return distillation_loss(s, t, batch.intent, alpha, temperature), {}
    return loss
