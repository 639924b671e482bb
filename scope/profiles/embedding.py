"""User profile encodings: the frozen half of Eq. 24, and the sole interface from U-SCOPE to completion.

``h_u = MLP(SBERT(text(profile_u)))``. The profile (:meth:`scope.profiles.schema.Profile.to_text`, without
the reasoning) is encoded by a *frozen* Sentence-BERT (all-MiniLM-L6-v2, 384-d, L2-normalised): that is
what this module computes and ``recipes/embed.py`` stores. The MLP has one home, the completion model
(:class:`completion.dit.EntityEmbedder`): it standardises these encodings with statistics of the
training users and is trained with U-MASK and the DiT by the completion objective (Algorithm 1), so
``h_u`` is learned, not a fixed projection. A new user's encoding comes from its profile at
inference time: rerun ``embed`` with that user; the training users' rows stay what the engine was
trained on (it checks, ``recipes/complete.py``).

Pooling: ``mean`` (the encoder's own pooling, what all-MiniLM-L6-v2 was trained with) or ``cls``
(the first token's output, the paper's ``[CLS]`` reading), L2-normalised either way.

Files written by :func:`write_user_embeddings` (``recipes/embed.py``) into one folder:

``user_embeddings.safetensors``
    ``user_id`` int64 ``[N]``, ``embedding`` float32 ``[N, 384]`` (the frozen encodings); header
    metadata ``format = uscope-user-embeddings/2``, ``encoder``, ``pooling``, ``dim``. Row i of both
    tensors is the same user. Read it with :func:`load_user_embeddings` (numpy + safetensors only).
``user_profiles.parquet``
    one row per user: ``user_id``, ``split``, ``profile_text``, ``profile_json``, ``embedding``
    (list of float32), for inspection and joins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EMBEDDINGS_FILE = "user_embeddings.safetensors"
PROFILES_FILE = "user_profiles.parquet"
FORMAT = "uscope-user-embeddings/2"
POOLINGS = ("mean", "cls")


class ProfileEncoder:
    """Frozen Sentence-BERT: profile texts -> L2-normalised encodings [N, 384] (``pooling`` mean or cls)."""

    def __init__(self, sentence_model, pooling: str = "mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        dim_of = getattr(sentence_model, "get_embedding_dimension", None) or sentence_model.get_sentence_embedding_dimension
        self.sentence_model, self.pooling, self.dim = sentence_model, pooling, dim_of()

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.pooling == "mean":
            out = self.sentence_model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                             normalize_embeddings=True, show_progress_bar=False)
        else:
            tokens = self.sentence_model.encode(texts, batch_size=batch_size, output_value="token_embeddings",
                                                show_progress_bar=False)
            out = torch.nn.functional.normalize(torch.stack([t[0] for t in tokens]), dim=-1)
        return out.float().cpu().numpy().astype(np.float32)


def write_user_embeddings(out_dir: str | Path, user_ids, texts: list[str], profiles_json: list[str], splits: list[str],
                          embedding: np.ndarray, encoder_name: str, pooling: str) -> Path:
    """Write the two files described in the module docstring (each atomically)."""
    import pandas as pd
    from safetensors.torch import save_file

    from scope.io import atomic_path

    out_dir = Path(out_dir)
    user_ids = np.asarray(user_ids, np.int64)
    if not (len(user_ids) == len(texts) == len(embedding)):
        raise ValueError("user_ids, texts and embeddings must have the same length")
    meta = {"format": FORMAT, "encoder": encoder_name, "pooling": pooling, "dim": str(embedding.shape[1])}
    with atomic_path(out_dir / EMBEDDINGS_FILE) as tmp:
        save_file({"user_id": torch.from_numpy(user_ids), "embedding": torch.from_numpy(np.ascontiguousarray(embedding))},
                  str(tmp), metadata=meta)
    frame = pd.DataFrame({"user_id": user_ids, "split": splits, "profile_text": texts, "profile_json": profiles_json,
                          "embedding": list(embedding.astype(np.float32))})
    with atomic_path(out_dir / PROFILES_FILE) as tmp:
        frame.to_parquet(tmp, index=False)
    return out_dir / EMBEDDINGS_FILE


def load_user_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(user_id [N] int64, encodings [N, 384] float32)`` from a folder or its ``user_embeddings.safetensors``."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_FILE
    with safe_open(str(path), framework="numpy") as f:
        found = (f.metadata() or {}).get("format")
        if found != FORMAT:
            raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r}: rerun recipes/embed.py to write it")
        return f.get_tensor("user_id"), f.get_tensor("embedding")
