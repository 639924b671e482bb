"""Mask-guided diffusion transformer (DiT) over C x T x H x W behaviour tensors.

Read top to bottom: embedders, the adaLN-Zero block, the final layer, the model, the presets.
The model follows facebookresearch/DiT with three changes for completion:
- tokens are 3-D patches (t0, h0, w0) of [x_t ; M (.) X ; M (; prior)] (noisy tensor, evidence
  values, evidence mask, and the deterministic prior when the model predicts a residual over it,
  see `completion.model`), so the evidence enters by concatenation; T, H, W are zero-padded up to
  a multiple of the patch size and the output is cropped back, so odd patch sizes and non-square
  grids work;
- positions are a fixed 3-D sine-cosine embedding of the token grid, plus a learned weekday
  embedding and a learned map of time-of-day Fourier features when timestamps are given;
- the condition is c = t_emb + e_u + e_tau: e_u an MLP of the entity vector (any [N, d_e] side
  information, e.g. the U-SCOPE embedding h_u or a POI profile), e_tau a learned task embedding.
The output is the X_0 estimate or v (`completion.diffusion.x0_estimate`; of the residual, with a prior; no
learned variance).

The calendar is a weekday embedding plus time-of-day Fourier features, so one checkpoint reads
15-, 30- or 60-minute steps. Presets: tiny / S / B / L (:data:`DIT_PRESETS`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                   Embedders: timestep, entity, positions                      #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the diffusion step -> MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class EntityEmbedder(nn.Module):
    """e_u = h_u, the MLP of Eq. 24: standardised side information of the entity -> an MLP, trained with
    the DiT and U-MASK by the completion objective (Algorithm 1).

    The input is any [N, d_e] row per entity: for users, the frozen SBERT encoding of the profile
    (``recipes/embed.py``). L2-normalised profile encodings of one cohort share most of their
    direction, so the MLP sees them standardised per dimension, with the mean and spread of the
    training entities (:meth:`fit`, once, before training; stored with the checkpoint).
    """

    def __init__(self, entity_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(entity_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.register_buffer("feature_mean", torch.zeros(entity_dim))
        self.register_buffer("feature_scale", torch.ones(entity_dim))

    @torch.no_grad()
    def fit(self, features: Tensor) -> None:
        """Standardisation statistics from the training entities' rows [N, d_e], one row per entity;
        a dimension that does not vary among them is centred only."""
        std = features.std(0, unbiased=False)
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, entity: Tensor) -> Tensor:
        return self.mlp((entity - self.feature_mean) / self.feature_scale)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[len(positions), dim] sine-cosine embedding (dim even)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> Tensor:
    """Fixed embedding of a (nt, nh, nw) token grid -> [nt * nh * nw, dim]; time gets half the dims."""
    d_hw = dim // 4 // 2 * 2
    d_t = dim - 2 * d_hw
    nt, nh, nw = grid
    et = sincos_1d(d_t, torch.arange(nt))[:, None, None].expand(nt, nh, nw, d_t)
    eh = sincos_1d(d_hw, torch.arange(nh))[None, :, None].expand(nt, nh, nw, d_hw)
    ew = sincos_1d(d_hw, torch.arange(nw))[None, None, :].expand(nt, nh, nw, d_hw)
    return torch.cat([et, eh, ew], dim=-1).reshape(nt * nh * nw, dim)


class CalendarEmbedder(nn.Module):
    """Learned weekday embedding + a linear map of time-of-day Fourier features, per token.

    Time of day enters as the fraction of the day `slot / slots_per_day` (sin/cos of `harmonics`
    multiples), not as a slot index, so one checkpoint reads data of any step length (15-, 30- or
    60-minute slots): set `slots_per_day` to the data's before use (`CompletionModel.set_slots_per_day`).
    """

    def __init__(self, hidden_size: int, slots_per_day: int, harmonics: int = 4):
        super().__init__()
        self.slots_per_day, self.harmonics = slots_per_day, harmonics
        self.weekday = nn.Embedding(7, hidden_size)
        self.time_of_day = nn.Linear(2 * harmonics, hidden_size)

    def forward(self, timestamps: Tensor, t0: int, nt: int) -> Tensor:
        """timestamps long [B, T, 2] -> [B, nt, D] (slots past T reuse the last timestamp)."""
        idx = (torch.arange(nt, device=timestamps.device) * t0).clamp(max=timestamps.shape[1] - 1)
        ts = timestamps[:, idx].long()
        k = torch.arange(1, self.harmonics + 1, device=ts.device)
        angle = 2 * math.pi * ts[..., 1:].float() / self.slots_per_day * k
        return self.weekday(ts[..., 0]) + self.time_of_day(torch.cat([angle.sin(), angle.cos()], -1))


#################################################################################
#                                Core DiT Model                                 #
#################################################################################

class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: shift, scale and gate come from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its (t0, h0, w0, C) patch."""

    def __init__(self, hidden_size: int, patch_size: tuple[int, int, int], out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, math.prod(patch_size) * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Denoiser: (x_t, t, M (.) X, M, entity, task[, timestamps, prior]) -> estimate of the clean tensor.

    With `prior_input` the deterministic prior is a fourth group of input channels (the model then
    predicts the residual over it, see `completion.model`).
    """

    def __init__(self, channels: int, entity_dim: int, num_tasks: int = 3,
                 patch_size: tuple[int, int, int] = (4, 2, 2), hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 slots_per_day: int = 96, entity_conditioning: bool = True, calendar: bool = True,
                 prior_input: bool = False):
        super().__init__()
        self.channels = channels
        self.entity_conditioning = entity_conditioning  # False: the "DiT without entity conditioning" control
        self.calendar = calendar  # False: no weekday / time-of-day embedding (an ablation)
        self.prior_input = prior_input
        self.patch_size = tuple(patch_size)
        groups = 4 if prior_input else 3
        self.x_embedder = nn.Conv3d(groups * channels, hidden_size, self.patch_size, stride=self.patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.entity_embedder = EntityEmbedder(entity_dim, hidden_size)
        self.task_embedder = nn.Embedding(num_tasks, hidden_size)
        self.calendar_embedder = CalendarEmbedder(hidden_size, slots_per_day)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, self.patch_size, channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        w = self.x_embedder.weight.data  # the patch embedding is a linear map of each patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for emb in (self.task_embedder, self.calendar_embedder.weekday):
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.calendar_embedder.time_of_day.weight, std=0.02)
        for mlp in (self.t_embedder.mlp, self.entity_embedder.mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity map, the model as the zero map.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """[B, 3C, T, H, W] -> tokens [B, L, D] and the token grid (zero-pads to the patch size)."""
        pads = [(-n) % p for n, p in zip(x.shape[2:], self.patch_size)]
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        x = self.x_embedder(x)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int], size: tuple[int, int, int]) -> Tensor:
        """[B, L, t0 h0 w0 C] -> [B, C, T, H, W], cropping the padding."""
        (nt, nh, nw), (t0, h0, w0) = grid, self.patch_size
        x = x.reshape(x.shape[0], nt, nh, nw, t0, h0, w0, self.channels)
        x = torch.einsum("bthwpqrc->bctphqwr", x)
        x = x.reshape(x.shape[0], self.channels, nt * t0, nh * h0, nw * w0)
        T, H, W = size
        return x[:, :, :T, :H, :W]

    def forward(self, x_t: Tensor, t: Tensor, evidence_x: Tensor, evidence: Tensor,
                entity: Tensor, task: Tensor, timestamps: Tensor | None = None,
                prior: Tensor | None = None) -> Tensor:
        """
        x_t: [B, C, T, H, W] noisy tensor; t: [B] diffusion steps;
        evidence_x = M (.) X and evidence = M (broadcast to channels): [B, C, T, H, W];
        entity: [B, d_e]; task: long [B]; timestamps: long [B, T, 2] or None;
        prior: [B, C, T, H, W], required exactly when the model was built with `prior_input`.
        """
        if (prior is not None) != self.prior_input:
            raise ValueError(f"this DiT was built with prior_input={self.prior_input}; "
                             f"got {'a' if prior is not None else 'no'} prior")
        size = tuple(x_t.shape[2:])
        inputs = [x_t, evidence_x, evidence] + ([prior] if prior is not None else [])
        x, grid = self.patchify(torch.cat(inputs, dim=1))
        x = x + sincos_3d(x.shape[-1], grid).to(x)
        if timestamps is not None and self.calendar:
            cal = self.calendar_embedder(timestamps, self.patch_size[0], grid[0])  # [B, nt, D]
            x = x + cal[:, :, None, None].expand(-1, -1, grid[1], grid[2], -1).flatten(1, 3)
        c = self.t_embedder(t) + self.task_embedder(task)
        if self.entity_conditioning:
            c = c + self.entity_embedder(entity)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c), grid, size)


#################################################################################
#                                  DiT Presets                                  #
#################################################################################

DIT_PRESETS = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=2),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
}


def dit_from_preset(name: str, channels: int, entity_dim: int, **kwargs) -> DiT:
    """DiT of a preset size; kwargs (patch_size, num_tasks, ...) pass through."""
    return DiT(channels, entity_dim, **{**DIT_PRESETS[name], **kwargs})
