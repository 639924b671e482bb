"""U-MASK: a per-entity, per-task evidence mask over T x H x W (paper section 4, Eq. 5-18).

Pipeline for a batch of entities b and their tasks tau:

  X_b -> h_b -> (F_short, F_long, F_pat) -> F_{b,tau} -> lambda         (Eq. 5-7)
  F_pat -> Z (K refinement steps) -> soft groups A, similarity S -> gamma_b -> rho~_b  (Eq. 8-13)
  phi^tau_t, psi_hw(Z, lambda, E_pos), beta_tau -> scores p (+ cold-start mixing)     (Eq. 14-15, 18)
  k_b = floor(rho~_b N_b); Gumbel-top-k hard mask with a straight-through soft top-k  (Eq. 16)
  soft mask M' = I (.) p                                                              (Eq. 17)

N_b counts the coordinates of the task's *available* region; p is a distribution over that
region, so evidence is only ever chosen there and target coordinates are never revealed.

Decisions where the paper leaves room (kept here, next to the code they shape):
- The behavioural encoder sees only the available region (X (.) A and A), never the targets.
- Eq. 5 reads T_hier(h_b) with h_b both the behaviour summary (section 4.1) and U-SCOPE's semantic
  embedding (Eq. 24, "the sole interface between U-SCOPE and U-MASK"). Both enter: each pooled
  behaviour summary gets a linear map of h_u added before its MLP, so h_u reaches F_pat, hence Z,
  the groups A, the neighbour similarity s_b and the budget gamma_b, rho~_b (Eq. 9-13), and the
  placement scores psi (Eq. 15). With little evidence (cold start) the summaries are near zero
  and Z is mostly h_u: neighbours are then users with similar profiles. h_u is the same vector the
  DiT is conditioned on (the entity MLP of `completion.dit.EntityEmbedder`).
- T_hier works at three temporal scales: F_short pools the last `short_window` available slots,
  F_long pools all available slots, F_pat is an attention pooling with a learned query.
- G_tau is an amortised sensitivity head (a per-task linear map of F) trained end to end; its
  square plus eps is the diagonal Fisher information of Eq. 7.
- U in S = alpha A A^T + (1 - alpha) U U^T is the row-normalised Z (cosine similarity), and
  ||Z_b|| in e_b is divided by sqrt(d) to keep gamma out of saturation at initialisation.
- Neighbours (Eq. 11): in training, the other entities of the batch with the same task; at
  evaluation, a bank of training entities' Z per task (a FIFO buffer filled during training and
  saved with the model), so a batch of one entity gets the same gamma it would in a batch.
- Gumbel noise perturbs the scores only in training; evaluation takes the plain top-k of p.
- The relaxation is a sigmoid soft top-k whose threshold solves sum_i sigma((g_i - theta)/t) =
  rho~ N; theta is found by bisection and made differentiable by one Newton step (the
  implicit-function gradient), so L_rec reaches rho_tau, w, c (through rho~) and phi, beta, psi
  (through the scores). The hard mask is used in the forward pass (straight-through).
- Initialisation: phi^tau of the short and long tasks starts as a ramp that favours the most
  recent slots (logits -3 .. 3 over the window) with beta_tau = 0.9, so a forecasting mask starts
  by hiding the *oldest* evidence, the shape the paper's Fig. 8 reports after training. A uniform
  start (`recency_init=0`) hides random slots, and with a prior built from the evidence
  (`completion.priors`) that costs the most recent values. Through the DiT's evidence channels
  alone the relaxation's gradients are ~1e-5, too small for L_rec to undo a bad start in a CPU
  budget; `completion.model` also passes L_rec through the prior (`prior_gradient`), which
  multiplies them by ~200 (measured: benchmarks/README.md, "Completion, diagnosed").
- Cold-start mixing (Eq. 18) spreads eps uniformly over the available region (eps / N; this is
  eps / THW when every coordinate is available).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from completion.dit import sincos_1d
from completion.tasks import TASKS, task_index


@dataclass(frozen=True)
class MaskOutput:
    M: Tensor  # float [B, T, H, W], binary in value; straight-through gradients in training
    soft: Tensor  # M' = I (.) p, float [B, T, H, W] (Eq. 17)
    p: Tensor  # sampling distribution over the available region, [B, T, H, W]
    k: Tensor  # long [B], evidence budget k_b
    rho: Tensor  # rho~_b [B]
    gamma: Tensor  # gamma_b [B]
    F_short: Tensor  # [B, d]
    F_long: Tensor  # [B, d]
    F_pat: Tensor  # [B, d]
    Z: Tensor  # refined pattern representation [B, d]
    A: Tensor  # soft group assignments [B, G]


class TaskLinear(nn.Module):
    """A linear map with one weight per task: y_b = W_{tau_b} x_b + b_{tau_b}."""

    def __init__(self, num_tasks: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_tasks, d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(num_tasks, d_out))

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        return torch.einsum("bi,bio->bo", x, self.weight[task]) + self.bias[task]


def masked_mean(h: Tensor, weight: Tensor) -> Tensor:
    """Mean of h [B, T, d] over slots with weight [B, T] (0 weight everywhere gives 0)."""
    return (h * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1e-6)


#################################################################################
#               Eq. 5-6: behavioural encoder, T_hier and P_tau                  #
#################################################################################

class BehaviourEncoder(nn.Module):
    """X_b -> h_b: per-slot embeddings [B, T, d] of the visible evidence (X (.) A, A)."""

    def __init__(self, channels: int, d: int):
        super().__init__()
        self.cell = nn.Conv3d(2 * channels, d, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.temporal = nn.Conv1d(d, d, kernel_size=3, padding=1)

    def forward(self, x: Tensor, A: Tensor) -> Tensor:
        """x: [B, C, T, H, W] normalised values; A: [B, C, T, H, W] visible available region."""
        h = F.gelu(self.cell(torch.cat([x * A, A], dim=1)))  # [B, d, T, H, W]
        h = h.mean(dim=(3, 4))  # [B, d, T]
        return (h + F.gelu(self.temporal(h))).transpose(1, 2)


class HierarchicalTemporal(nn.Module):
    """Eq. 5: T_hier(h_b) -> F_short (recent window), F_long (whole history), F_pat (pattern)."""

    def __init__(self, d: int, short_window: int):
        super().__init__()
        self.short_window = short_window
        self.short = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.long = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.query = nn.Parameter(torch.randn(d) / math.sqrt(d))
        self.key = nn.Linear(d, d)
        self.pat = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, h: Tensor, slot_available: Tensor, user: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """h: [B, T, d]; slot_available: bool [B, T] (slot has any available coordinate); user: [B, d],
        the user's h_u projected to d (added to each pooled summary before its MLP), or None."""
        B, T, d = h.shape
        u = 0.0 if user is None else user
        slots = torch.arange(T, device=h.device).expand(B, T)
        last = torch.where(slot_available, slots, -1).max(1, keepdim=True).values
        recent = slot_available & (slots > last - self.short_window)
        F_short = self.short(masked_mean(h, recent.float()) + u)
        F_long = self.long(masked_mean(h, slot_available.float()) + u)
        pos = sincos_1d(d, torch.arange(T)).to(h)
        logits = (self.key(h + pos) @ self.query) / math.sqrt(d)
        attn = logits.masked_fill(~slot_available, -torch.inf).softmax(1).nan_to_num(0.0)
        F_pat = self.pat((attn[..., None] * h).sum(1) + u)
        return F_short, F_long, F_pat


#################################################################################
#                                  U-MASK                                       #
#################################################################################

@dataclass(frozen=True)
class UMaskConfig:
    """U-MASK's settings (saved with a checkpoint inside its model config)."""

    d: int = 64  # width of the behaviour encoder and of every feature F (Eq. 5-8)
    groups: int = 8  # soft groups of Eq. 9
    refine_steps: int = 2  # K refinement steps of Z (Eq. 8)
    eta: float = 0.5  # refinement step size (Eq. 8)
    group_temperature: float = 1.0  # softmax temperature of the soft groups A (Eq. 9)
    alpha: float = 0.5  # S = alpha A A^T + (1 - alpha) U U^T (Eq. 10)
    fisher_eps: float = 1e-4  # eps added to the diagonal Fisher information (Eq. 7)
    cold_eps: float = 0.1  # cold-start mixing weight (Eq. 18)
    short_window: int = 8  # slots pooled by F_short (Eq. 5)
    soft_temperature: float = 0.5  # temperature of the straight-through soft top-k (Eq. 16)
    bank_size: int = 512  # training entities' Z kept per task as evaluation neighbours (Eq. 11)
    rho_init: float = 0.9  # initial evidence budget rho_tau (Eq. 13)
    recency_init: float = 3.0  # initial recency ramp of phi for the forecasting tasks (Eq. 14)


class UMask(nn.Module):
    """Learned evidence masks for entities b and tasks tau; see the module docstring."""

    def __init__(self, channels: int, T: int, cell_dim: int, config: UMaskConfig = UMaskConfig(), user_dim: int = 0):
        super().__init__()
        n, d = len(TASKS), config.d
        self.refine_steps, self.eta, self.alpha = config.refine_steps, config.eta, config.alpha
        self.group_temperature, self.fisher_eps, self.cold_eps = config.group_temperature, config.fisher_eps, \
            config.cold_eps
        self.soft_temperature = config.soft_temperature
        self.encoder = BehaviourEncoder(channels, d)
        self.T_hier = HierarchicalTemporal(d, config.short_window)
        self.P = TaskLinear(n, 3 * d, d)  # P_tau, Eq. 6
        self.G = TaskLinear(n, d, d)  # G_tau, Eq. 7
        self.Delta = TaskLinear(n, d, d)  # Delta_tau, Eq. 8
        self.Phi = nn.Linear(d, config.groups)  # Eq. 9
        self.w = nn.Parameter(torch.zeros(3))  # Eq. 12
        rho_logit = math.log(config.rho_init / (1 - config.rho_init))
        self.c = nn.Parameter(torch.tensor(rho_logit))
        self.rho_logit = nn.Parameter(torch.full((n,), rho_logit))
        # phi^tau_t and beta_tau (Eq. 14). Forecasting tasks start from a recency ramp, logits from
        # -recency_init (oldest slot) to +recency_init (newest), weighted by beta = 0.9: the mask
        # starts by hiding the oldest evidence. The cold task starts uniform (beta = 0.5).
        ramp = torch.linspace(-config.recency_init, config.recency_init, T)
        forecast = torch.tensor([name in ("short", "long") for name in TASKS])
        self.phi_logit = nn.Parameter(torch.where(forecast[:, None], ramp, 0.0))
        self.beta_logit = nn.Parameter(torch.where(forecast, math.log(9.0), 0.0))
        self.E_pos = nn.Linear(cell_dim, d)  # per-cell features -> E_pos(h, w), Eq. 15
        # h_u (Eq. 24, width user_dim) -> the width of T_hier (Eq. 5); zero at the start, so an untrained
        # mask reads the behaviour alone and the user's share grows with L_rec. user_dim = 0: no user input.
        self.user = nn.Linear(user_dim, d) if user_dim else None
        if self.user is not None:
            nn.init.zeros_(self.user.weight)
            nn.init.zeros_(self.user.bias)
        self.register_buffer("bank", torch.zeros(n, config.bank_size, d))
        self.register_buffer("bank_seen", torch.zeros(n, dtype=torch.long))

    # Eq. 5-7 ------------------------------------------------------------------
    def features(self, x: Tensor, A: Tensor, task: Tensor, h_u: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> F_short, F_long, F_pat and lambda = sqrt(diag I), diag I = G_tau(F_{b,tau})^2 + eps."""
        h = self.encoder(x, A)
        user = None if self.user is None or h_u is None else self.user(h_u)
        F_short, F_long, F_pat = self.T_hier(h, A.flatten(3).any(3).any(1), user)
        F_bt = self.P(torch.cat([F_short, F_long, F_pat], dim=1), task)  # Eq. 6
        fisher = self.G(F_bt, task) ** 2 + self.fisher_eps  # Eq. 7: diag(I)
        return F_short, F_long, F_pat, fisher.sqrt()

    # Eq. 8 --------------------------------------------------------------------
    def refine(self, F_pat: Tensor, task: Tensor) -> Tensor:
        """Z_{k+1} = Z_k + eta * Delta_tau(Z_k), Z_0 = F_pat, K = refine_steps."""
        Z = F_pat
        for _ in range(self.refine_steps):
            Z = Z + self.eta * torch.tanh(self.Delta(Z, task))
        return Z

    # Eq. 9-13 -----------------------------------------------------------------
    def groups(self, Z: Tensor) -> Tensor:
        """Eq. 9: A = softmax(Phi(Z) / T)."""
        return (self.Phi(Z) / self.group_temperature).softmax(-1)

    def neighbour_similarity(self, Z: Tensor, A: Tensor, task: Tensor) -> Tensor:
        """Eq. 10-11: S = alpha A A'^T + (1 - alpha) U U'^T, s_b = max_j S_bj over neighbours j.

        Neighbours are the batch's other entities with the same task in training, and the
        stored bank of training entities for that task at evaluation (0 when there are none).
        """
        if self.training:
            Z_n, A_n = Z, A
            allowed = (task[:, None] == task[None, :]) & ~torch.eye(len(Z), dtype=torch.bool, device=Z.device)
        else:
            Z_n = self.bank.flatten(0, 1)
            A_n = self.groups(Z_n)
            slot = torch.arange(self.bank.shape[1], device=Z.device)
            filled = (slot[None] < self.bank_seen[:, None]).flatten()
            owner = torch.arange(len(TASKS), device=Z.device).repeat_interleave(self.bank.shape[1])
            allowed = (owner[None] == task[:, None]) & filled[None]
        U, U_n = F.normalize(Z, dim=-1), F.normalize(Z_n, dim=-1)
        S = self.alpha * A @ A_n.T + (1 - self.alpha) * U @ U_n.T
        s = S.masked_fill(~allowed, -torch.inf).max(1).values
        return torch.where(allowed.any(1), s, torch.zeros_like(s))

    def gate(self, Z: Tensor, A: Tensor, task: Tensor) -> Tensor:
        """Eq. 12: e_b = [s_b, ||Z_b||, H(A_b)], gamma_b = sigmoid(w^T e_b + c)."""
        s = self.neighbour_similarity(Z, A, task)
        norm = Z.norm(dim=-1) / math.sqrt(Z.shape[-1])
        entropy = -(A * A.clamp(min=1e-12).log()).sum(-1)
        e = torch.stack([s, norm, entropy], dim=-1)
        return torch.sigmoid(e @ self.w + self.c)

    @torch.no_grad()
    def remember(self, Z: Tensor, task: Tensor) -> None:
        """Push training entities' Z into the per-task FIFO bank used at evaluation."""
        size = self.bank.shape[1]
        for tau in task.unique():
            z = Z[task == tau][-size:]
            pos = (self.bank_seen[tau] + torch.arange(len(z), device=Z.device)) % size
            self.bank[tau, pos] = z
            self.bank_seen[tau] += len(z)

    # Eq. 14-15, 18 --------------------------------------------------------------
    def scores(self, Z: Tensor, lam: Tensor, cells: Tensor, task: Tensor, available: Tensor) -> Tensor:
        """p = beta_tau phi^tau_t + (1 - beta_tau) psi_hw, normalised over the available region.

        psi_hw = ReLU(cos(Z (.) lambda, E_pos(h, w))). For cold-start, p~ = (1 - eps) p + eps / N.
        """
        E_pos = self.E_pos(cells)  # [B, H, W, d]
        psi = F.relu(F.cosine_similarity((Z * lam)[:, None, None], E_pos, dim=-1))  # [B, H, W]
        phi = torch.sigmoid(self.phi_logit[task])  # [B, T]
        beta = torch.sigmoid(self.beta_logit[task])[:, None, None, None]
        p = beta * phi[:, :, None, None] + (1 - beta) * psi[:, None]
        p = (p + 1e-6) * available
        p = p / p.flatten(1).sum(1).clamp(min=1e-12)[:, None, None, None]
        N = available.flatten(1).sum(1).clamp(min=1)[:, None, None, None]
        cold = (task == task_index("cold"))[:, None, None, None]
        return torch.where(cold, (1 - self.cold_eps) * p + self.cold_eps * available / N, p)

    # Eq. 16-17 ----------------------------------------------------------------
    def select(self, p: Tensor, rho: Tensor, available: Tensor,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Gumbel-top-k with k_b = floor(rho~_b N_b) -> (straight-through mask, k)."""
        B = p.shape[0]
        avail = available.flatten(1)
        N = avail.sum(1)
        k = torch.floor(rho.detach() * N).long()
        g = p.flatten(1).clamp(min=1e-12).log()
        if self.training:
            u = torch.rand(g.shape, generator=generator, device=g.device, dtype=g.dtype)
            u = u.clamp(1e-10, 1 - 1e-10)
            g = g - torch.log(-torch.log(u))
        g = g.masked_fill(~avail, -torch.inf)
        rank = g.argsort(1, descending=True).argsort(1)
        hard = (rank < k[:, None]).to(p.dtype)
        soft = soft_top_k(g, rho * N, avail, self.soft_temperature)
        M = hard + (soft - soft.detach())  # exactly `hard` in value, d soft in gradient
        return M.reshape(B, *p.shape[1:]), k

    def forward(self, x: Tensor, available: Tensor, visible: Tensor, cells: Tensor, task: Tensor,
                generator: torch.Generator | None = None, h_u: Tensor | None = None) -> MaskOutput:
        """x: [B, C, T, H, W]; available: bool [B, T, H, W]; visible: bool [B, C];
        cells: [B, H, W, cell_dim] per-cell features (E_pos source); task: long [B];
        h_u: [B, user_dim], the user embedding (Eq. 24), or None."""
        A_region = available[:, None] & visible[:, :, None, None, None]
        F_short, F_long, F_pat, lam = self.features(x, A_region.to(x.dtype), task, h_u)
        Z = self.refine(F_pat, task)
        A = self.groups(Z)
        gamma = self.gate(Z, A, task)
        rho = torch.sigmoid(self.rho_logit[task]) * gamma  # Eq. 13
        p = self.scores(Z, lam, cells, task, available)
        M, k = self.select(p, rho, available, generator)
        if self.training:
            self.remember(Z.detach(), task)
        return MaskOutput(M=M, soft=M.detach() * p, p=p, k=k, rho=rho, gamma=gamma,
                          F_short=F_short, F_long=F_long, F_pat=F_pat, Z=Z, A=A)


def soft_top_k(g: Tensor, K: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """sigma((g - theta) / t) with theta solving sum_i sigma((g_i - theta) / t) = K per row.

    theta comes from bisection (no gradient); one Newton step at the root adds the
    implicit-function gradient d theta / d(g, K) without changing the value.
    """
    t = temperature
    g_valid = g.masked_fill(~valid, 0.0)
    any_valid = valid.any(1)
    lo = torch.where(any_valid, g.detach().masked_fill(~valid, torch.inf).min(1).values, 0.0) - 20 * t
    hi = torch.where(any_valid, g.detach().masked_fill(~valid, -torch.inf).max(1).values, 0.0) + 20 * t
    with torch.no_grad():
        for _ in range(50):
            mid = (lo + hi) / 2
            total = (torch.sigmoid((g_valid - mid[:, None]) / t) * valid).sum(1)
            too_many = total > K
            lo, hi = torch.where(too_many, mid, lo), torch.where(too_many, hi, mid)
        theta0 = (lo + hi) / 2
    s0 = torch.sigmoid((g_valid - theta0[:, None]) / t) * valid
    slope = (s0 * (1 - s0)).sum(1).clamp(min=1e-6) / t
    theta = theta0 + (s0.sum(1) - K) / slope
    return torch.sigmoid((g_valid - theta[:, None]) / t) * valid


#################################################################################
#           Conventional fixed masks (the paper's Table 9 control)              #
#################################################################################

FIXED_MASKS = ("random", "tube", "temporal")


def fixed_mask(kind: str, available: Tensor, ratio: float,
               generator: torch.Generator | None = None) -> Tensor:
    """A conventional evidence mask with U-MASK's budget k_b = floor(ratio * N_b) -> float [B, T, H, W].

    random: k_b coordinates drawn uniformly from the available region;
    tube: whole spatial cells (h, w) revealed over all their available slots, cells in random
          order, the last cell cut at the budget;
    temporal: whole slots t revealed at all their available cells, slots in random order.
    Only available coordinates are ranked, so targets are never revealed.
    """
    if kind not in FIXED_MASKS:
        raise ValueError(f"unknown fixed mask {kind!r}; expected one of {FIXED_MASKS}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    B, T, H, W = available.shape
    device = available.device
    within = torch.rand((B, T, H, W), generator=generator, device=device)  # in [0, 1)
    if kind == "tube":  # integer key per cell, slot order within it
        group = _rank(torch.rand((B, 1, H * W), generator=generator, device=device)).reshape(B, 1, H, W)
        within = torch.arange(T, device=device)[None, :, None, None] / T
    elif kind == "temporal":  # integer key per slot, random cell order within it
        group = _rank(torch.rand((B, T), generator=generator, device=device))[:, :, None, None]
    else:
        group = torch.zeros((B, 1, 1, 1), device=device)
    u = group + within
    keys = u.expand(B, T, H, W).masked_fill(~available, torch.inf).flatten(1)
    k = torch.floor(ratio * available.flatten(1).sum(1)).long()
    return (_rank(keys) < k[:, None]).reshape(B, T, H, W).float()


def _rank(keys: Tensor) -> Tensor:
    """Rank of every key along the last axis (0 = smallest), as float."""
    return keys.argsort(-1).argsort(-1).to(torch.float32)
