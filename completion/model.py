"""U-MASK + DiT joined: the mask chooses the evidence, the DiT completes the rest.

The engine predicts each tensor as a deterministic prior plus a learned residual:

    X_0 = prior(M (.) X) + s (.) R_0,

where the prior (`completion.priors`, default `carry`: interpolation between evidence entries,
damped persistence after the last one, on the de-seasonalised series) is computed from the
revealed evidence alone, `s` is the per-channel scale of the residual on training targets, and
the DiT denoises the standardised residual R_0 (VP diffusion, X_0-style prediction). The DiT's
output layer starts at zero (adaLN-Zero), so an untrained engine, or one that learns nothing,
*is* the prior; the diffusion works on a unit-scale residual instead of a tensor whose level the
evidence already gives. `prior="zero"` with `s = 1` is the plain DiT of the paper.

The prior is computed from the hard evidence mask, so its value is exact; in training, U-MASK's
straight-through gradient also reaches it through a kernel smoother of the soft mask
(`completion.priors.smoother_gradient`, `prior_gradient=True`). Without that path the mask's
parameters only see L_rec through the DiT's evidence channels, a gradient of ~1e-5 that leaves the
budget and the placement where they started (measured: benchmarks/README.md).

`loss` is the reconstruction term of Algorithm 1 (Eq. 19) on the standardised residual;
`complete` draws several completions per entity with evidence clamping (Eq. 35) and a point
estimate. Both accept an explicit evidence mask `M` instead of U-MASK's, which is how
fixed-mask and whole-region controls reuse the same denoiser.

Point estimate (`Completion.point`): the mean over the samples' first reverse step of the DiT's
X_0 estimate at the noisiest level, where x_t carries no information, so the X_0 loss makes that
estimate the conditional mean E[X_0 | evidence] in one forward pass. Averaging whole samples
targets the same mean but adds the sampler's error and the variance of a few samples.

Calibration on validation entities (`completion.evaluate.calibrate`, after training; 1 before):
- the residual's weight alpha per task, `X_0 = prior + alpha s (.) R_0`, the least-squares value
  in [0, 1] on val targets: where the DiT's residual does not help (e.g. a checkpoint applied
  zero-shot to data of another step length) alpha goes to 0 and the engine falls back to its prior,
  so on val it is never worse than the prior;
- the samples' spread: samples are centred on the point estimate, each keeping its deviation from
  the sample mean multiplied by `spread` (per task and channel), so that the central 90% interval
  covers 90% of val targets.

With `center=True` every entity is shifted by the mean of its available region, per channel
(RevIN-style instance normalisation, computed from the available region only, so no target
leaks into it), and the shift is added back to the samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from completion.batch import Batch
from completion.diffusion import PARAMETERIZATIONS, VPSchedule, sample_many, x0_estimate, x0_loss
from completion.dit import DiT, dit_from_preset
from completion.masks import MaskOutput, UMask, UMaskConfig
from completion.priors import (PRIORS, compute_prior, profile_at, resample_profile, shrunk_mean, slot_profile,
                               smoother_gradient)
from completion.tasks import TASKS, Regions, TaskConfig, make_regions

OBJECTIVES = ("diffusion", "regression")


@dataclass(frozen=True)
class Completion:
    samples: Tensor  # [S, B, C, T, H, W], normalised units
    point: Tensor  # [B, C, T, H, W], the point estimate (see the module docstring)
    evidence: Tensor  # [B, C, T, H, W], the revealed entries
    mask: MaskOutput | None  # U-MASK's output, None when M was given

    @property
    def mean(self) -> Tensor:
        return self.samples.mean(0)


class CompletionModel(nn.Module):
    def __init__(self, umask: UMask, dit: DiT, schedule: VPSchedule, center: bool = True,
                 prior: str = "carry", prior_damping: float = 0.97, prior_seasonal: bool = True,
                 slots_per_day: int = 96, prior_gradient: bool = True, prior_shrinkage: float = 0.0,
                 parameterization: str = "x0"):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
        self.parameterization = parameterization
        self.umask, self.dit, self.schedule, self.center = umask, dit, schedule, center
        self.prior_kind, self.prior_damping, self.prior_seasonal = prior, prior_damping, prior_seasonal
        self.prior_shrinkage = prior_shrinkage
        self.prior_gradient = prior_gradient and prior != "zero"
        self.slots_per_day = slots_per_day
        C = dit.channels
        self.register_buffer("profile", torch.zeros(C, slots_per_day))  # slot-of-day profile, fitted on train
        self.register_buffer("residual_scale", torch.ones(C))  # s, fitted on train
        self.register_buffer("spread", torch.ones(len(TASKS), C))  # calibrated on validation
        self.register_buffer("residual_weight", torch.ones(len(TASKS)))  # alpha, calibrated on validation

    # -- statistics fitted before training and after it ------------------------------------
    @torch.no_grad()
    def fit_statistics(self, train: Batch, task_config: TaskConfig, tasks: tuple[str, ...],
                       generator: torch.Generator, max_entities: int = 2048) -> None:
        """The slot-of-day profile, the residual scale s and the standardisation of the entity
        vectors (one row per distinct training entity: users repeat over their windows) from training
        entities (once, before training): s_c is the RMS of (X - prior) over target entries of
        randomly drawn tasks."""
        self.dit.entity_embedder.fit(torch.unique(train.entity, dim=0))
        rows = torch.randperm(len(train), generator=generator)[:max_entities]
        batch = train[rows]
        if self.prior_kind == "carry" and self.prior_seasonal and batch.timestamps is not None:
            self.profile.copy_(slot_profile(batch.x, batch.observed, batch.timestamps, self.slots_per_day))
        if self.prior_kind == "zero":
            return
        task = torch.tensor([TASKS.index(t) for t in tasks])[torch.randint(len(tasks), (len(batch),),
                                                                           generator=generator)]
        regions = make_regions(task, batch.observed, batch.x.shape[1], task_config, generator)
        evidence = regions.evidence(regions.available.to(batch.x.dtype))
        x0 = batch.x - self.offset(batch.x, regions)
        residual = x0 - self.prior(x0, evidence, batch.timestamps)
        w = regions.target.to(x0.dtype)
        ms = ((residual**2) * w).sum((0, 2, 3, 4)) / w.sum((0, 2, 3, 4)).clamp(min=1)
        self.residual_scale.copy_(torch.where(w.sum((0, 2, 3, 4)) > 0, ms.sqrt().clamp(min=1e-3), 1.0))

    def calibration(self) -> dict[str, list]:
        """The calibrated residual weight [tasks] and spread [tasks, C], as lists (JSON)."""
        return {"residual_weight": self.residual_weight.tolist(), "spread": self.spread.tolist()}

    def load_calibration(self, calibration: dict[str, list]) -> None:
        for name in ("residual_weight", "spread"):
            getattr(self, name).copy_(torch.tensor(calibration[name]))

    def set_slots_per_day(self, slots_per_day: int) -> None:
        """Read data of another step length: resample the profile, retune the calendar embedding and
        the per-slot damping of the prior (damping ** (old / new slots per day) per new slot) and its
        shrinkage (pseudo-entries, in proportion to the entries a day holds)."""
        if slots_per_day != self.slots_per_day:
            self.profile = resample_profile(self.profile, slots_per_day)
            self.dit.calendar_embedder.slots_per_day = slots_per_day
            self.prior_damping = self.prior_damping ** (self.slots_per_day / slots_per_day)
            self.prior_shrinkage = self.prior_shrinkage * slots_per_day / self.slots_per_day
            self.slots_per_day = slots_per_day

    # -- building blocks -------------------------------------------------------------------
    def offset(self, x: Tensor, regions: Regions) -> Tensor:
        """Per-entity, per-channel mean over the available region, shrunk toward the training mean
        (0) like the prior's levels -> [B, C, 1, 1, 1] (0 if none)."""
        if not self.center:
            return torch.zeros_like(x[:, :, :1, :1, :1])
        return shrunk_mean(x, regions.evidence(regions.available.to(x.dtype)), self.prior_shrinkage)

    def seasonal(self, timestamps: Tensor | None) -> Tensor | None:
        """The slot-of-day profile at every slot -> [B, C, T, 1, 1] (None without it)."""
        if not self.prior_seasonal or timestamps is None:
            return None
        return profile_at(self.profile, timestamps)

    def prior(self, x: Tensor, evidence: Tensor, timestamps: Tensor | None) -> Tensor:
        """The deterministic prior of x [B, C, T, H, W] from its evidence entries alone."""
        return compute_prior(self.prior_kind, x, evidence, self.prior_damping, self.seasonal(timestamps),
                             self.prior_shrinkage)

    def _scale(self) -> Tensor:
        return self.residual_scale[None, :, None, None, None]

    def evidence_mask(self, x: Tensor, batch: Batch, regions: Regions, task: Tensor,
                      M: Tensor | None, generator: torch.Generator | None
                      ) -> tuple[Tensor, MaskOutput | None]:
        """The T x H x W evidence mask for centred x: U-MASK's, or M restricted to the available region."""
        if M is not None:
            return M.to(x.dtype) * regions.available, None
        out = self.umask(x, regions.available, regions.visible, batch.cells, task, generator,
                         self.user_embedding(batch))
        return out.M, out

    def user_embedding(self, batch: Batch) -> Tensor | None:
        """h_u = MLP(standardised entity vector) (Eq. 24): the DiT's entity embedder, also read by U-MASK;
        None for the no-entity control."""
        return self.dit.entity_embedder(batch.entity) if self.dit.entity_conditioning else None

    def _denoiser_inputs(self, batch: Batch, task: Tensor, regions: Regions, M: Tensor | None,
                         generator: torch.Generator | None):
        """Centred x, the prior, the evidence mask [B, C, T, H, W], the DiT's conditioning and U-MASK's output."""
        offset = self.offset(batch.x, regions)
        x0 = batch.x - offset
        M, mask = self.evidence_mask(x0, batch, regions, task, M, generator)
        evidence = regions.evidence(M)
        prior = self.prior(x0, evidence.detach(), batch.timestamps)
        if self.prior_gradient and mask is not None and torch.is_grad_enabled():
            seasonal = self.seasonal(batch.timestamps)
            prior = prior + smoother_gradient(x0 if seasonal is None else x0 - seasonal, evidence)
        prior_in = prior if self.dit.prior_input else None
        cond = (evidence * x0, evidence, batch.entity, task, batch.timestamps, prior_in)
        return offset, x0, prior, evidence, cond, mask

    # -- Algorithm 1 and sampling ----------------------------------------------------------
    def loss(self, batch: Batch, task: Tensor, regions: Regions, M: Tensor | None = None,
             generator: torch.Generator | None = None, objective: str = "diffusion"
             ) -> tuple[Tensor, MaskOutput | None]:
        """Eq. 19: error of the standardised residual on target entries.

        `diffusion`: X_0-prediction at a random noise level (the engine); `regression`: only at the
        noisiest level, where x_t carries no information, i.e. one forward pass trained with plain
        MSE (the deterministic control; its point estimate is read the same way as the engine's).
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        _, x0, prior, _, cond, mask = self._denoiser_inputs(batch, task, regions, M, generator)
        r0 = (x0 - prior) / self._scale()
        if objective == "regression":
            t = torch.full((len(batch),), self.schedule.num_steps - 1, device=x0.device)
        else:
            t = torch.randint(0, self.schedule.num_steps, (len(batch),), generator=generator, device=x0.device)
        noise = torch.randn(r0.shape, generator=generator, dtype=r0.dtype, device=r0.device)
        x_t = self.schedule.q_sample(r0, t, noise)
        return x0_loss(self.denoise(x_t, t, cond), r0, regions.target), mask

    def denoise(self, x_t: Tensor, t: Tensor, cond: tuple) -> Tensor:
        """The X_0 estimate of the standardised residual at x_t, step t (`completion.diffusion.x0_estimate`)."""
        return x0_estimate(self.dit(x_t, t, *cond), x_t, t, self.schedule, self.parameterization)

    @torch.no_grad()
    def complete(self, batch: Batch, task: Tensor, regions: Regions, n_samples: int = 8,
                 steps: int | None = None, eta: float | None = None, M: Tensor | None = None,
                 generator: torch.Generator | None = None, recenter: bool = True) -> Completion:
        """`n_samples` completions per entity and the point estimate; evidence entries come back exactly as observed.

        With `recenter` (default) the samples are moved to have the point estimate as their mean;
        `recenter=False` keeps the sampler's own mean (to compare the two estimates). `steps=0`
        skips the sampler: one "sample", the point estimate.
        """
        offset, x0, prior, evidence, cond, mask = self._denoiser_inputs(batch, task, regions, M, generator)
        evidence = evidence.detach()
        r_obs = evidence * (x0 - prior) / self._scale()
        cond = [_repeat(v, n_samples) for v in cond]

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            return self.denoise(x_t, t, cond)

        first = torch.full((n_samples * len(batch),), self.schedule.num_steps - 1, device=x0.device)
        noise = torch.randn((n_samples, *r_obs.shape), generator=generator, dtype=r_obs.dtype, device=r_obs.device)
        alpha = self.residual_weight[task][:, None, None, None, None]
        point_r = alpha * denoise(noise.flatten(0, 1), first).reshape(noise.shape).mean(0)
        if steps == 0:  # the point estimate alone
            r = point_r[None]
        else:
            r = alpha * sample_many(denoise, r_obs, evidence, self.schedule, n_samples, steps, eta, generator)
        spread = self.spread[task][:, :, None, None, None]
        r = (point_r if recenter else r.mean(0)) + spread * (r - r.mean(0))
        base = prior + offset
        point = torch.where(evidence.bool(), batch.x, base + self._scale() * point_r)
        samples = torch.where(evidence.bool(), batch.x, base + self._scale() * r)
        return Completion(samples=samples, point=point, evidence=evidence, mask=mask)


def _repeat(v: Tensor | None, n: int) -> Tensor | None:
    """Repeat a batch n times, sample-major, as `sample_many` expects."""
    return None if v is None else v.repeat(n, *([1] * (v.dim() - 1)))


FROM_DATA = {"from_data": True}  # field metadata: set from the data's shape, not from a config file


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a CompletionModel (saved with its checkpoints)."""

    channels: int = field(default=0, metadata=FROM_DATA)
    T: int = field(default=0, metadata=FROM_DATA)
    cell_dim: int = field(default=0, metadata=FROM_DATA)
    entity_dim: int = field(default=0, metadata=FROM_DATA)
    preset: str = "tiny"
    patch_size: tuple[int, int, int] = (4, 2, 2)
    slots_per_day: int = 96  # the data's step; in a recipe config 0 = from the data's timestamps
    diffusion_steps: int = 1000
    center: bool = True
    entity_conditioning: bool = True  # False: c = e_t + e_tau only (the no-entity control)
    calendar: bool = True  # False: no weekday / time-of-day embedding (an ablation)
    prior: str = "carry"  # zero (the plain DiT) | carry (completion.priors)
    prior_damping: float = 0.97  # carry: persistence damped by damping ** h toward the series mean
    prior_seasonal: bool = True  # carry: run on the de-seasonalised series (train slot-of-day profile)
    prior_shrinkage: float = 0.0  # carry and centring: evidence means shrunk toward the train mean by k pseudo-entries
    prior_gradient: bool = True  # U-MASK gets L_rec's gradient through the prior (straight-through smoother)
    parameterization: str = "x0"  # what the DiT outputs: x0 | v (X_0 follows x_t at low noise; being measured, issue 26)
    umask: UMaskConfig = field(default_factory=UMaskConfig)

    def __post_init__(self):
        if self.prior not in PRIORS:
            raise ValueError(f"unknown prior {self.prior!r}; expected one of {PRIORS}")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if isinstance(self.umask, dict):  # as stored in a checkpoint's JSON metadata
            object.__setattr__(self, "umask", UMaskConfig(**self.umask))


def build_model(config: ModelConfig) -> CompletionModel:
    dit = dit_from_preset(config.preset, config.channels, config.entity_dim,
                          patch_size=config.patch_size, slots_per_day=config.slots_per_day,
                          entity_conditioning=config.entity_conditioning, calendar=config.calendar,
                          prior_input=config.prior != "zero")
    user_dim = dit.entity_embedder.mlp[-1].out_features if config.entity_conditioning else 0
    umask = UMask(config.channels, config.T, config.cell_dim, config.umask, user_dim=user_dim)
    return CompletionModel(umask, dit, VPSchedule(config.diffusion_steps), center=config.center,
                           prior=config.prior, prior_damping=config.prior_damping,
                           prior_seasonal=config.prior_seasonal, slots_per_day=config.slots_per_day,
                           prior_gradient=config.prior_gradient, prior_shrinkage=config.prior_shrinkage,
                           parameterization=config.parameterization)
