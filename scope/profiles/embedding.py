"""User embeddings ``h_u`` (Eq. 24): the sole interface from U-SCOPE to the completion module.

``h_u = MLP(SBERT(text(profile_u)))``: the profile (:meth:`scope.profiles.schema.Profile.to_text`, without
the reasoning) is encoded by a *frozen* Sentence-BERT (all-MiniLM-L6-v2, 384-d, L2-normalised),
then mapped by a small MLP head (Linear -> GELU -> Linear) to ``d`` dimensions. The head is
initialised from a seed here; the completion module may train it jointly with the DiT
(Algorithm 1), which is why the frozen encodings are stored too.

Files written by :func:`write_user_embeddings` (``recipes/embed.py``) into one folder:

``user_embeddings.safetensors``
    ``user_id`` int64 ``[N]``, ``embedding`` float32 ``[N, d]`` (``h_u``), ``sbert`` float32
    ``[N, 384]`` (the frozen encodings); header metadata ``format = uscope-user-embeddings/1``,
    ``encoder``, ``dim``, ``head`` (JSON of :class:`HeadConfig`). Row i of every tensor is the same
    user. Read it with :func:`load_user_embeddings` (numpy + safetensors only, no LLM library).
``user_profiles.parquet``
    one row per user: ``user_id``, ``split``, ``profile_text``, ``profile_json``, ``embedding``
    (list of float32), for inspection and joins.
``head.safetensors``
    the MLP head's weights (``net.0.weight`` ...), metadata = its :class:`HeadConfig`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

EMBEDDINGS_FILE = "user_embeddings.safetensors"
PROFILES_FILE = "user_profiles.parquet"
HEAD_FILE = "head.safetensors"
FORMAT = "uscope-user-embeddings/1"


@dataclass(frozen=True)
class HeadConfig:
    in_dim: int = 384
    hidden_dim: int = 256
    dim: int = 64
    seed: int = 0


class EmbeddingHead(nn.Module):
    """The MLP of Eq. 24: frozen-encoder features -> ``h_u``."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        self.net = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, cfg.dim))
        with torch.no_grad():  # seeded init, independent of the global RNG
            for layer in (self.net[0], self.net[2]):
                bound = 1 / np.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class ProfileEncoder:
    """Frozen Sentence-BERT + MLP head: profile texts -> (h_u [N, d], sbert [N, 384])."""

    def __init__(self, sentence_model, head: EmbeddingHead):
        dim_of = getattr(sentence_model, "get_embedding_dimension", None) or sentence_model.get_sentence_embedding_dimension
        if dim_of() != head.cfg.in_dim:
            raise ValueError(f"the head expects {head.cfg.in_dim}-d features, the encoder gives {dim_of()}")
        self.sentence_model, self.head = sentence_model, head.eval()

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros((0, self.head.cfg.dim), np.float32), np.zeros((0, self.head.cfg.in_dim), np.float32)
        sbert = self.sentence_model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                           normalize_embeddings=True, show_progress_bar=False)
        h = self.head(sbert.float().cpu())
        return h.numpy().astype(np.float32), sbert.cpu().numpy().astype(np.float32)


def write_user_embeddings(out_dir: str | Path, user_ids, texts: list[str], profiles_json: list[str], splits: list[str],
                          embedding: np.ndarray, sbert: np.ndarray, head: EmbeddingHead, encoder_name: str) -> Path:
    """Write the three files described in the module docstring (each atomically)."""
    import pandas as pd
    from safetensors.torch import save_file

    from scope.io import atomic_path

    out_dir = Path(out_dir)
    user_ids = np.asarray(user_ids, np.int64)
    if not (len(user_ids) == len(texts) == len(embedding) == len(sbert)):
        raise ValueError("user_ids, texts and embeddings must have the same length")
    meta = {"format": FORMAT, "encoder": encoder_name, "dim": str(head.cfg.dim), "head": json.dumps(asdict(head.cfg))}
    with atomic_path(out_dir / EMBEDDINGS_FILE) as tmp:
        save_file({"user_id": torch.from_numpy(user_ids), "embedding": torch.from_numpy(np.ascontiguousarray(embedding)),
                   "sbert": torch.from_numpy(np.ascontiguousarray(sbert))}, str(tmp), metadata=meta)
    with atomic_path(out_dir / HEAD_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp),
                  metadata={"head": json.dumps(asdict(head.cfg))})
    frame = pd.DataFrame({"user_id": user_ids, "split": splits, "profile_text": texts, "profile_json": profiles_json,
                          "embedding": list(embedding.astype(np.float32))})
    with atomic_path(out_dir / PROFILES_FILE) as tmp:
        frame.to_parquet(tmp, index=False)
    return out_dir / EMBEDDINGS_FILE


def load_user_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(user_id [N] int64, h_u [N, d] float32)`` from a folder or its ``user_embeddings.safetensors``."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_FILE
    with safe_open(str(path), framework="numpy") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        return f.get_tensor("user_id"), f.get_tensor("embedding")


def load_head(path: str | Path) -> EmbeddingHead:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        cfg = HeadConfig(**json.loads(f.metadata()["head"]))
    head = EmbeddingHead(cfg)
    head.load_state_dict(load_file(str(path)))
    return head.eval()
