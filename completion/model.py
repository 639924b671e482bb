"""U-MASK + DiT joined: the mask chooses the evidence, the DiT completes the rest.

`loss` is the reconstruction term of Algorithm 1 (Eq. 19); `complete` draws several completions
per entity with evidence clamping (Eq. 35). Both accept an explicit evidence mask `M` instead of
U-MASK's, which is how fixed-mask and whole-region controls reuse the same denoiser.

With `center=True` every entity is shifted by the mean of its available region, per channel
(RevIN-style instance normalisation, computed from the available region only, so no target
leaks into it), and the shift is added back to the samples. In log space this is a per-entity
rescaling; it is what lets a model trained on NJ's large-scale areas complete the test split's
~60x smaller ones (measured in `completion/nj.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from completion.data import Batch
from completion.diffusion import VPSchedule, sample_many, x0_loss
from completion.dit import DiT, dit_from_preset
from completion.masks import MaskOutput, UMask
from completion.tasks import Regions


@dataclass(frozen=True)
class Completion:
    samples: Tensor  # [S, B, C, T, H, W], normalised units
    evidence: Tensor  # [B, C, T, H, W], the revealed entries
    mask: MaskOutput | None  # U-MASK's output, None when M was given

    @property
    def mean(self) -> Tensor:
        return self.samples.mean(0)


class CompletionModel(nn.Module):
    def __init__(self, umask: UMask, dit: DiT, schedule: VPSchedule, center: bool = True):
        super().__init__()
        self.umask, self.dit, self.schedule, self.center = umask, dit, schedule, center

    def offset(self, x: Tensor, regions: Regions) -> Tensor:
        """Per-entity, per-channel mean over the available region -> [B, C, 1, 1, 1] (0 if none)."""
        if not self.center:
            return torch.zeros_like(x[:, :, :1, :1, :1])
        A = regions.evidence(regions.available.to(x.dtype))
        return ((x * A).sum((2, 3, 4)) / A.sum((2, 3, 4)).clamp(min=1))[..., None, None, None]

    def evidence_mask(self, x: Tensor, batch: Batch, regions: Regions, task: Tensor,
                      M: Tensor | None, generator: torch.Generator | None
                      ) -> tuple[Tensor, MaskOutput | None]:
        """The T x H x W evidence mask for centred x: U-MASK's, or M restricted to the available region."""
        if M is not None:
            return M.to(x.dtype) * regions.available, None
        out = self.umask(x, regions.available, regions.visible, batch.cells, task, generator)
        return out.M, out

    def loss(self, batch: Batch, task: Tensor, regions: Regions, M: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, MaskOutput | None]:
        """Eq. 19: X_0-prediction error on target entries, with evidence M (.) X as input."""
        x0 = batch.x - self.offset(batch.x, regions)
        M, mask = self.evidence_mask(x0, batch, regions, task, M, generator)
        evidence = regions.evidence(M)
        t = torch.randint(0, self.schedule.num_steps, (len(batch),), generator=generator,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        x0_hat = self.dit(x_t, t, evidence * x0, evidence, batch.entity, task, batch.timestamps)
        return x0_loss(x0_hat, x0, regions.target), mask

    @torch.no_grad()
    def complete(self, batch: Batch, task: Tensor, regions: Regions, n_samples: int = 8,
                 steps: int | None = None, eta: float | None = None, M: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Completion:
        """`n_samples` completions per entity; evidence entries come back exactly as observed."""
        offset = self.offset(batch.x, regions)
        M, mask = self.evidence_mask(batch.x - offset, batch, regions, task, M, generator)
        evidence = regions.evidence(M.detach())
        x_obs = evidence * (batch.x - offset)
        cond = [_repeat(v, n_samples) for v in (x_obs, evidence, batch.entity, task, batch.timestamps)]

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            return self.dit(x_t, t, *cond)

        samples = sample_many(denoise, x_obs, evidence, self.schedule, n_samples, steps, eta, generator)
        samples = torch.where(evidence.bool(), batch.x, samples + offset)
        return Completion(samples=samples, evidence=evidence, mask=mask)


def _repeat(v: Tensor | None, n: int) -> Tensor | None:
    """Repeat a batch n times, sample-major, as `sample_many` expects."""
    return None if v is None else v.repeat(n, *([1] * (v.dim() - 1)))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a CompletionModel (saved with its checkpoints)."""

    channels: int
    T: int
    cell_dim: int
    entity_dim: int
    preset: str = "tiny"
    patch_size: tuple[int, int, int] = (4, 2, 2)
    slots_per_day: int = 96
    diffusion_steps: int = 1000
    center: bool = True
    entity_conditioning: bool = True  # False: c = e_t + e_tau only (the no-entity control)
    umask: dict = field(default_factory=dict)  # extra UMask keyword arguments (d, groups, ...)


def build_model(config: ModelConfig) -> CompletionModel:
    umask = UMask(config.channels, config.T, config.cell_dim, **config.umask)
    dit = dit_from_preset(config.preset, config.channels, config.entity_dim,
                          patch_size=tuple(config.patch_size), slots_per_day=config.slots_per_day,
                          entity_conditioning=config.entity_conditioning)
    return CompletionModel(umask, dit, VPSchedule(config.diffusion_steps), center=config.center)
