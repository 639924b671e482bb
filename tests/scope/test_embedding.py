"""Eq. 24 embeddings: frozen Sentence-BERT -> MLP head -> h_u; shape, values, determinism, file format."""

import numpy as np
import pytest
import torch

from recipes import embed as embed_recipe
from scope.profiles.embedding import (EMBEDDINGS_FILE, PROFILES_FILE, EmbeddingHead, HeadConfig, ProfileEncoder,
                                      load_head, load_user_embeddings)
from scope.profiles.llms import load_embedder
from tests.scope.conftest import data_args


@pytest.fixture(scope="module")
def sbert():
    return load_embedder()


def test_encoder_is_frozen_sbert_then_the_head(sbert, corpus):
    texts = [corpus.results[u].profile.to_text() for u in corpus.profiled("train")[:3]]
    encoder = ProfileEncoder(sbert, EmbeddingHead(HeadConfig(dim=16, seed=3)))
    h, features = encoder.encode(texts)
    assert h.shape == (3, 16) and features.shape == (3, 384) and h.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)            # normalised SBERT
    raw = sbert.encode(texts, normalize_embeddings=True)
    assert np.allclose(features, raw, atol=1e-5)                                   # the frozen encoder itself
    expected = encoder.head(torch.from_numpy(raw)).detach().numpy()
    assert np.allclose(h, expected, atol=1e-5)                                     # h_u = MLP(SBERT(text))
    assert not any(p.requires_grad for p in sbert.parameters())


def test_same_seed_same_embeddings_and_different_profiles_differ(sbert, corpus):
    texts = [corpus.results[u].profile.to_text() for u in corpus.profiled("train")[:4]]
    a, _ = ProfileEncoder(sbert, EmbeddingHead(HeadConfig(seed=1))).encode(texts)
    b, _ = ProfileEncoder(sbert, EmbeddingHead(HeadConfig(seed=1))).encode(texts)
    c, _ = ProfileEncoder(sbert, EmbeddingHead(HeadConfig(seed=2))).encode(texts)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert np.linalg.matrix_rank(a) == 4


def test_recipe_writes_per_user_embeddings(small_cohort, tmp_path):
    args = embed_recipe.EmbedArguments(**vars(data_args(small_cohort, tmp_path / "cache")), output_dir=str(tmp_path / "emb"), dim=8)
    summary = embed_recipe.main(args)
    user_ids, h = load_user_embeddings(tmp_path / "emb")
    assert summary["users"] == len(user_ids) == 40 and h.shape == (40, 8) and np.isfinite(h).all()
    assert list(user_ids) == sorted(user_ids)
    import pandas as pd

    table = pd.read_parquet(tmp_path / "emb" / PROFILES_FILE)
    assert list(table["user_id"]) == list(user_ids) and table["profile_text"].str.startswith("Persona:").all()
    assert np.allclose(np.stack(table["embedding"]), h)
    head = load_head(tmp_path / "emb" / "head.safetensors")
    assert head.cfg.dim == 8
    again = embed_recipe.main(args)  # deterministic, and the cached teacher is reused
    assert np.array_equal(load_user_embeddings(tmp_path / "emb" / EMBEDDINGS_FILE)[1], h) and again["users"] == 40
