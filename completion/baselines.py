"""Baselines of the completion benchmark, all behind one interface (Time-Series-Library style).

Every method answers `predict(batch, task, regions) -> [B, C, T, H, W]` in normalised units; only
entries in `regions.target` are scored. Following the evaluation protocol, every baseline reads
the *whole* available region (visible channels) as evidence; only U-MASK chooses a subset.

- `Persistence`: the last available value of each series.
- `HistoricalAverage`: per entity, channel and cell, the mean over the available slots, plus
  (optionally) a slot-of-day profile fitted on training entities.
- `ARIMA`: one low-order ARIMA per entity/channel/cell series, fitted on the available history,
  with daily seasonality as Fourier regressors (not a 96-lag seasonal model).
- `MaskedPatchTransformer`: a small hand-written channel-independent patch transformer that reads
  the whole masked series (values and availability per patch) and writes every patch back.
- `PatchTSTForecaster`: transformers' `PatchTSTForPrediction`, one per forecasting task.
- `UserKNN`: the mean profile of the training users nearest by an embedding (h_u).
- `DiTForecaster`: the shared DiT of `CompletionModel` with the evidence given explicitly. With
  `evidence="available"` it is the fixed-mask (random / tube / temporal, trained with
  `TrainConfig.mask`) and the no-entity (`ModelConfig.entity_conditioning=False`) controls; with
  `evidence="umask"` it is U-MASK itself.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from completion.batch import Batch
from completion.evaluate import EVIDENCE, complete_chunked
from completion.model import CompletionModel
from completion.priors import carry_prior, profile_at, slot_profile
from completion.tasks import Regions, TaskConfig, make_regions, task_index


def available_evidence(regions: Regions) -> Tensor:
    """The whole available region, broadcast over visible channels -> float [B, C, T, H, W]."""
    return regions.evidence(regions.available.float())


#################################################################################
#                      Persistence and historical average                       #
#################################################################################

class Persistence:
    """x^_{b,c,t,h,w} = the last available value of the series (the naive forecast).

    It is the `carry` prior with no damping and no seasonal profile (`completion.priors`): between
    two available entries it interpolates, and a cell without any takes the other cells' mean.
    """

    def predict(self, batch: Batch, task: Tensor, regions: Regions) -> Tensor:
        return carry_prior(batch.x, available_evidence(regions))


class HistoricalAverage:
    """x^_{b,c,t,h,w} = mean of x_{b,c,.,h,w} over available slots [+ profile_c(s_t) - its mean there].

    A cell without available slots falls back to the entity's channel mean, an entity without
    any to 0 (the training mean in normalised units). With `profile=True`, `fit` estimates the
    slot-of-day profile per channel as the training entities' mean deviation from their own
    per-cell mean; the prediction adds the profile at each target slot minus its mean over the
    available slots it was averaged from.
    """

    def __init__(self, profile: bool = False, slots_per_day: int = 96):
        self.use_profile, self.slots_per_day = profile, slots_per_day
        self.profile: Tensor | None = None  # [C, slots_per_day]

    def fit(self, train: Batch) -> HistoricalAverage:
        if self.use_profile:
            if train.timestamps is None:
                raise ValueError("the slot-of-day profile needs timestamps")
            self.profile = slot_profile(train.x, train.observed, train.timestamps, self.slots_per_day)
        return self

    def predict(self, batch: Batch, task: Tensor, regions: Regions) -> Tensor:
        x, A = batch.x, available_evidence(regions)
        n_cell = A.sum(2, keepdim=True)
        n_entity = A.sum((2, 3, 4), keepdim=True)
        cell_mean = (x * A).sum(2, keepdim=True) / n_cell.clamp(min=1)
        entity_mean = (x * A).sum((2, 3, 4), keepdim=True) / n_entity.clamp(min=1)
        pred = torch.where(n_cell > 0, cell_mean, entity_mean).expand_as(x).clone()
        if self.use_profile:
            if self.profile is None:
                raise RuntimeError("HistoricalAverage(profile=True) must be fitted first")
            prof = profile_at(self.profile, batch.timestamps)  # [B, C, T, 1, 1]
            prof_seen = (prof * A).sum(2, keepdim=True) / n_cell.clamp(min=1)
            pred = pred + prof - torch.where(n_cell > 0, prof_seen, prof.mean(2, keepdim=True))
        return pred


#################################################################################
#                       ARIMA with Fourier seasonality                          #
#################################################################################

def fourier_terms(slot_of_day: np.ndarray, K: int, slots_per_day: int) -> np.ndarray:
    """[1, sin(2 pi k s / P), cos(2 pi k s / P) for k = 1..K] -> [len, 2K + 1]."""
    angle = 2 * np.pi * np.outer(slot_of_day, np.arange(1, K + 1)) / slots_per_day
    return np.concatenate([np.ones((len(slot_of_day), 1)), np.sin(angle), np.cos(angle)], axis=1)


class ARIMA:
    """One ARIMA(p, d, q) per (entity, channel, cell) series with a daily Fourier regressor.

    Daily seasonality: a history of 32-60 slots (8-15 hours) cannot identify per-series Fourier
    coefficients (they extrapolate wildly), so `fit` estimates each channel's slot-of-day
    profile on the training split and smooths it to K harmonics; that curve s_c(slot) is the one
    exogenous regressor, with its own coefficient in every series (y_t = mu + b s_c(t) + ARMA).
    The history of a series is its stretch of available slots since the last gap (a missing day
    or hour), up to its last available slot; the forecast covers the rest. The cold task has no
    history prefix and is refused. Orders with d = q = 0 are fitted
    by conditional least squares (statsmodels `AutoReg`, about 2 ms a series, so a benchmark
    split runs in about a minute); any other order uses statsmodels' state-space `ARIMA` (0.1-0.5
    s a series). A non-stationary AR fit forecasts its last value (the random walk, ARIMA(0,1,0));
    a history too short for the order or constant, or a non-finite forecast, its mean.
    """

    def __init__(self, order: tuple[int, int, int] = (1, 0, 0), fourier: int = 2,
                 slots_per_day: int = 96, progress: bool = False):
        self.order, self.K, self.slots_per_day, self.progress = tuple(order), fourier, slots_per_day, progress
        self.season: np.ndarray | None = None  # [C, slots_per_day]

    def fit(self, train: Batch) -> ARIMA:
        if self.K > 0:
            profile = HistoricalAverage(profile=True, slots_per_day=self.slots_per_day).fit(train).profile.double().numpy()
            basis = fourier_terms(np.arange(self.slots_per_day), self.K, self.slots_per_day)
            coef, *_ = np.linalg.lstsq(basis, profile.T, rcond=None)
            self.season = (basis @ coef).T
        return self

    def forecast(self, y: np.ndarray, h: int, season: np.ndarray | None) -> np.ndarray:
        """Fit on y and forecast the next h slots; `season` is s_c over all len(y) + h slots."""
        from statsmodels.tsa.ar_model import AutoReg
        from statsmodels.tsa.arima.model import ARIMA as StatsARIMA

        n = len(y)
        p, d, q = self.order
        fallback = np.full(h, y.mean() if n else 0.0)
        if n < p + d + q + 4 or np.ptp(y) < 1e-8:
            return fallback
        ex_in, ex_out = (None, None) if season is None else (season[:n, None], season[n:, None])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if d == 0 and q == 0:
                fit = AutoReg(y, lags=p, trend="c", exog=ex_in).fit()
                stationary = p == 0 or bool((np.abs(fit.roots) > 1).all())
                out = (fit.predict(start=n, end=n + h - 1, exog_oos=ex_out) if stationary
                       else np.full(h, y[-1]))  # a unit-root fit: the random-walk forecast
            else:
                out = StatsARIMA(y, exog=ex_in, order=self.order).fit().forecast(h, exog=ex_out)
        return out if np.isfinite(out).all() else fallback

    def predict(self, batch: Batch, task: Tensor, regions: Regions) -> Tensor:
        if self.K > 0 and (self.season is None or batch.timestamps is None):
            raise ValueError("ARIMA with Fourier seasonality must be fitted first and needs timestamps")
        A = available_evidence(regions).bool()
        pred = HistoricalAverage().predict(batch, task, regions)
        T = batch.x.shape[2]
        series = regions.target.any(2).nonzero().tolist()  # (b, c, h, w) with something to forecast
        x = batch.x.double().numpy()
        if (task == task_index("cold")).any():
            raise ValueError("ARIMA forecasts the slots after a history prefix (short/long tasks); the cold task's "
                             "scattered entries have none")
        for b, c, i, j in tqdm(series, disable=not self.progress, desc="arima"):
            a = A[b, c, :, i, j].numpy()
            if not a.any():
                continue  # no history at all: the historical average's fallback stays
            end = int(np.flatnonzero(a)[-1]) + 1
            gaps = np.flatnonzero(~a[:end])
            start = int(gaps[-1]) + 1 if len(gaps) else 0  # the stretch of history since the last gap
            season = None if self.K == 0 else self.season[c, batch.timestamps[b, start:, 1].numpy()]
            pred[b, c, end:, i, j] = torch.as_tensor(self.forecast(x[b, c, start:end, i, j], T - end, season),
                                                     dtype=pred.dtype)
        return pred


#################################################################################
#                 Masked patch transformer (hand-written)                       #
#################################################################################

class MaskedPatchTransformer(nn.Module):
    """Channel-independent patch transformer over single series (Nie et al., 2023, in spirit).

    A series of T slots, with its evidence zeroed outside the available slots, is shifted by its
    available mean (RevIN-style), cut into non-overlapping patches of `patch_len` slots
    ([values; availability] per patch -> a token), embedded with patch position, slot of day
    and channel, encoded by a transformer, and each token is mapped back to its patch.
    """

    def __init__(self, T: int, channels: int, patch_len: int = 8, d_model: int = 64, depth: int = 2,
                 num_heads: int = 4, slots_per_day: int = 96):
        super().__init__()
        self.T, self.patch_len = T, patch_len
        self.n_patches = math.ceil(T / patch_len)
        self.embed = nn.Linear(2 * patch_len, d_model)
        self.pos = nn.Parameter(torch.randn(self.n_patches, d_model) * 0.02)
        self.slot = nn.Embedding(slots_per_day, d_model)
        self.channel = nn.Embedding(channels, d_model)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, patch_len)

    def forward(self, x: Tensor, a: Tensor, slot: Tensor, channel: Tensor) -> Tensor:
        """x, a: [N, T] values and availability; slot: long [N, T]; channel: long [N] -> [N, T]."""
        mu = (x * a).sum(1, keepdim=True) / a.sum(1, keepdim=True).clamp(min=1)
        pad = self.n_patches * self.patch_len - self.T
        v = F.pad((x - mu) * a, (0, pad)).reshape(-1, self.n_patches, self.patch_len)
        m = F.pad(a, (0, pad)).reshape(-1, self.n_patches, self.patch_len)
        first = slot[:, ::self.patch_len]
        h = self.embed(torch.cat([v, m], -1)) + self.pos + self.slot(first) + self.channel(channel)[:, None]
        out = self.head(self.encoder(h)).flatten(1)[:, :self.T]
        return out + mu

    def predict(self, batch: Batch, task: Tensor, regions: Regions, chunk: int = 8192) -> Tensor:
        self.eval()
        x, a, slot, channel = series_view(batch, regions)
        with torch.no_grad():
            out = torch.cat([self(x[i:i + chunk], a[i:i + chunk], slot[i:i + chunk], channel[i:i + chunk])
                             for i in range(0, len(x), chunk)])
        return from_series(out, batch.x.shape)


def series_view(batch: Batch, regions: Regions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[B, C, T, H, W] -> B*C*H*W series: values, availability, slot of day, channel id."""
    B, C, T, H, W = batch.x.shape
    def flat(v: Tensor) -> Tensor:
        return v.permute(0, 1, 3, 4, 2).reshape(-1, T)
    slot = (batch.timestamps[..., 1].long() if batch.timestamps is not None
            else torch.arange(T).expand(B, T))
    slot = slot[:, None, :, None, None].expand(B, C, T, H, W)
    channel = torch.arange(C)[None, :, None, None].expand(B, C, H, W).reshape(-1)
    return flat(batch.x), flat(available_evidence(regions)), flat(slot), channel


def from_series(series: Tensor, shape: torch.Size) -> Tensor:
    B, C, T, H, W = shape
    return series.reshape(B, C, H, W, T).permute(0, 1, 4, 2, 3)


def train_patch_transformer(model: MaskedPatchTransformer, train: Batch, task_config: TaskConfig,
                   tasks: tuple[str, ...] = ("short", "long"), steps: int = 1000, batch_size: int = 32,
                   lr: float = 1e-3, seed: int = 0, progress: bool = False) -> list[float]:
    """MSE on target entries of randomly drawn entities and tasks; returns the per-step losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    task_ids = torch.tensor([task_index(t) for t in tasks])
    losses = []
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc="masked patch transformer"):
        rows = torch.randint(len(train), (batch_size,), generator=g)
        batch = train[rows]
        task = task_ids[torch.randint(len(task_ids), (batch_size,), generator=g)]
        regions = make_regions(task, batch.observed, batch.x.shape[1], task_config, g)
        pred = from_series(model(*series_view(batch, regions)), batch.x.shape)
        target = regions.target.float()
        loss = ((pred - batch.x) ** 2 * target).sum() / target.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


#################################################################################
#                 PatchTST (transformers) and user kNN                          #
#################################################################################

class PatchTSTForecaster:
    """transformers' ``PatchTSTForPrediction`` (Nie et al., 2023) on one forecasting task.

    Each (entity, cell) of a window is a C-channel series; the model reads its ``T - horizon``
    context slots (``past_observed_mask`` = the available region, so the instance scaling ignores
    missing entries) and predicts the last ``horizon`` slots. Channel-independent, as the paper
    (``channel_attention=False``, shared patch embedding). The cold task has no context prefix and
    gets no PatchTST. ``fit`` trains on target entries of training windows (MSE).
    """

    def __init__(self, T: int, channels: int, horizon: int, patch_length: int = 8, d_model: int = 64,
                 layers: int = 2, heads: int = 4):
        from transformers import PatchTSTConfig, PatchTSTForPrediction

        self.T, self.horizon, self.context = T, horizon, T - horizon
        config = PatchTSTConfig(num_input_channels=channels, context_length=self.context,
                                prediction_length=horizon, patch_length=patch_length, patch_stride=patch_length,
                                d_model=d_model, num_hidden_layers=layers, num_attention_heads=heads,
                                ffn_dim=4 * d_model, scaling="std", loss="mse")
        self.model = PatchTSTForPrediction(config)

    def _series(self, batch: Batch, regions: Regions) -> tuple[Tensor, Tensor]:
        """-> past values and observed mask [B*H*W, context, C] of the available region."""
        A = available_evidence(regions)
        def flat(v: Tensor) -> Tensor:  # [B, C, T, H, W] -> [B*H*W, T, C]
            B, C, T, H, W = v.shape
            return v.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)[:, :self.context]
        return flat(batch.x * A), flat(A)

    def _forecast(self, past: Tensor, observed: Tensor) -> Tensor:
        return self.model(past_values=past, past_observed_mask=observed).prediction_outputs

    def _place(self, batch: Batch, forecast: Tensor) -> Tensor:
        B, C, T, H, W = batch.x.shape
        out = batch.x.clone()
        out[:, :, self.context:] = forecast.reshape(B, H, W, self.horizon, C).permute(0, 4, 3, 1, 2)
        return out

    def fit(self, train: Batch, task_name: str, task_config: TaskConfig, steps: int, batch_size: int,
            lr: float = 1e-3, seed: int = 0) -> list[float]:
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        task_id = task_index(task_name)
        losses = []
        self.model.train()
        for _ in range(steps):
            batch = train[torch.randint(len(train), (batch_size,), generator=g)]
            task = torch.full((batch_size,), task_id)
            regions = make_regions(task, batch.observed, batch.x.shape[1], task_config, g)
            pred = self._place(batch, self._forecast(*self._series(batch, regions)))
            target = regions.target.float()
            loss = ((pred - batch.x) ** 2 * target).sum() / target.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        return losses

    def predict(self, batch: Batch, task: Tensor, regions: Regions, chunk: int = 64) -> Tensor:
        self.model.eval()
        with torch.no_grad():
            return torch.cat([self._place(batch[i:i + chunk], self._forecast(*self._series(batch[i:i + chunk],
                                                                                           regions[i:i + chunk])))
                              for i in range(0, len(batch), chunk)])


class UserKNN:
    """Borrow from similar users: the k training users nearest by cosine similarity of ``embed(entity)``
    (h_u of a trained engine: what a good user embedding should already give on cold start).

    ``fit`` keeps each training user's mean of every (channel, slot of day, cell) over its observed
    entries; ``predict`` returns, at every slot, the mean of the k neighbours' profiles there (their
    pooled entries), 0 (the training mean) where none has one. With ``own_level`` the prediction is
    shifted, per channel, to the entity's own mean over its available region (the neighbours' shape
    at the user's level).
    """

    def __init__(self, embed, k: int = 10, slots_per_day: int = 96, own_level: bool = False):
        self.embed, self.k, self.slots_per_day, self.own_level = embed, k, slots_per_day, own_level

    @torch.no_grad()
    def fit(self, train: Batch, chunk: int = 256) -> UserKNN:
        rows, owner = torch.unique(train.entity, dim=0, return_inverse=True)
        self.keys = F.normalize(self.embed(rows), dim=-1)
        _, C, T, H, W = train.x.shape
        S = self.slots_per_day
        self.sums = torch.zeros(len(rows) * S, C * H * W)
        self.counts = torch.zeros(len(rows) * S, H * W)
        for i in range(0, len(train), chunk):
            b = train[i:i + chunk]
            index = (owner[i:i + chunk, None] * S + b.timestamps[..., 1].long()).flatten()  # [b*T]
            obs = b.observed.float()  # [b, T, H, W]
            x = (b.x * obs[:, None]).permute(0, 2, 1, 3, 4).reshape(-1, C * H * W)
            self.sums.index_add_(0, index, x)
            self.counts.index_add_(0, index, obs.reshape(-1, H * W))
        self.shape = (C, H, W)
        return self

    @torch.no_grad()
    def predict(self, batch: Batch, task: Tensor, regions: Regions) -> Tensor:
        C, H, W = self.shape
        B, _, T = batch.x.shape[:3]
        S = self.slots_per_day
        k = min(self.k, len(self.keys))
        neighbours = (F.normalize(self.embed(batch.entity), dim=-1) @ self.keys.T).topk(k, dim=1).indices  # [B, k]
        index = neighbours[:, :, None] * S + batch.timestamps[..., 1].long()[:, None, :]  # [B, k, T]
        sums = self.sums[index].sum(1).reshape(B, T, C, H, W)
        counts = self.counts[index].sum(1).reshape(B, T, 1, H, W)
        pred = (sums / counts.clamp(min=1)).permute(0, 2, 1, 3, 4).contiguous()
        if self.own_level:
            A = available_evidence(regions)
            n = A.sum((2, 3, 4), keepdim=True)
            own = (batch.x * A).sum((2, 3, 4), keepdim=True) / n.clamp(min=1)
            borrowed = (pred * A).sum((2, 3, 4), keepdim=True) / n.clamp(min=1)
            pred = pred + torch.where(n > 0, own - borrowed, torch.zeros_like(own))
        return pred


#################################################################################
#                          DiT controls and U-MASK                              #
#################################################################################

class DiTForecaster:
    """The engine's point estimate (`point="first_step"`, see `completion.model`) or the mean of
    `n_samples` completions (`point="sample_mean"`), with evidence = the whole available region or
    U-MASK's."""

    def __init__(self, model: CompletionModel, evidence: str = "available", n_samples: int = 4,
                 steps: int | None = 20, seed: int = 0, chunk: int = 256, point: str = "first_step"):
        if evidence not in EVIDENCE:
            raise ValueError(f"unknown evidence {evidence!r}; expected one of {EVIDENCE}")
        if point not in POINTS:
            raise ValueError(f"unknown point estimate {point!r}; expected one of {POINTS}")
        self.model, self.evidence, self.point = model.eval(), evidence, point
        self.n_samples, self.steps, self.seed, self.chunk = n_samples, steps, seed, chunk
        self.samples: Tensor | None = None  # of the last predict call, for probabilistic scores

    def predict(self, batch: Batch, task: Tensor, regions: Regions) -> Tensor:
        self.samples, point = complete_chunked(self.model, batch, task, regions, self.evidence, self.n_samples,
                                               self.steps, self.seed, self.chunk,
                                               recenter=self.point == "first_step")
        return point if self.point == "first_step" else self.samples.mean(0)


POINTS = ("first_step", "sample_mean")


class ConditioningControl:
    """A forecaster read with other user vectors, same weights: what the entity vector (h_u's input)
    adds at test time. `mean`: every entity gets the batch's mean vector; `shuffled`: the distinct
    vectors (one per user) are handed on to other users by a seeded cyclic shift of a random order,
    so no user keeps its own."""

    KINDS = ("mean", "shuffled")

    def __init__(self, forecaster, kind: str, seed: int = 0):
        if kind not in self.KINDS:
            raise ValueError(f"unknown conditioning control {kind!r}; expected one of {self.KINDS}")
        self.forecaster, self.kind, self.seed = forecaster, kind, seed

    def controlled(self, batch: Batch) -> Batch:
        from dataclasses import replace

        if self.kind == "mean":
            return replace(batch, entity=batch.entity.mean(0, keepdim=True).expand_as(batch.entity).contiguous())
        rows, owner = torch.unique(batch.entity, dim=0, return_inverse=True)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed))
        given = torch.empty_like(order)
        given[order] = order.roll(1)   # the user at order[i] gets the vector of order[i - 1]
        return replace(batch, entity=rows[given][owner])

    def predict(self, batch: Batch, task: Tensor, regions: Regions) -> Tensor:
        out = self.forecaster.predict(self.controlled(batch), task, regions)
        self.samples = getattr(self.forecaster, "samples", None)
        return out


BASELINES = {"persistence": Persistence, "ha": HistoricalAverage, "arima": ARIMA, "masked_patch_transformer": MaskedPatchTransformer, "dit": DiTForecaster}


def make_baseline(name: str, **kwargs):
    """A baseline by name (see BASELINES); keyword arguments go to its constructor."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    return BASELINES[name](**kwargs)

