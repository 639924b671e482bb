"""Eq. 24's frozen half: profile -> frozen Sentence-BERT encoding (mean or cls pooling); values, determinism,
file format. The MLP that maps the encoding to h_u trains with the completion engine (tests/completion)."""

import numpy as np
import pytest

from recipes import embed as embed_recipe
from scope.profiles.embedding import EMBEDDINGS_FILE, PROFILES_FILE, ProfileEncoder, load_user_embeddings
from scope.profiles.llms import load_embedder
from tests.scope.conftest import data_args


@pytest.fixture(scope="module")
def sbert():
    return load_embedder()


def test_the_encoding_is_the_frozen_normalised_sbert_output(sbert, corpus):
    texts = [corpus.results[u].profile.to_text() for u in corpus.profiled("train")[:3]]
    features = ProfileEncoder(sbert).encode(texts)
    assert features.shape == (3, 384) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)            # normalised SBERT
    assert np.allclose(features, sbert.encode(texts, normalize_embeddings=True), atol=1e-5)
    assert not any(p.requires_grad for p in sbert.parameters())
    assert np.linalg.matrix_rank(features) == 3


def test_cls_pooling_is_the_first_tokens_output(sbert, corpus):
    texts = [corpus.results[u].profile.to_text() for u in corpus.profiled("train")[:2]]
    cls = ProfileEncoder(sbert, "cls").encode(texts)
    tokens = sbert.encode(texts, output_value="token_embeddings")
    first = np.stack([t[0].numpy() for t in tokens])
    assert np.allclose(cls, first / np.linalg.norm(first, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(cls, ProfileEncoder(sbert).encode(texts), atol=1e-2)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        ProfileEncoder(sbert, "max")


def test_recipe_writes_per_user_embeddings(small_cohort, tmp_path):
    args = embed_recipe.EmbedArguments(**vars(data_args(small_cohort, tmp_path / "cache")), output_dir=str(tmp_path / "emb"))
    summary = embed_recipe.main(args)
    user_ids, h = load_user_embeddings(tmp_path / "emb")
    assert summary["users"] == len(user_ids) == 40 and h.shape == (40, 384) and np.isfinite(h).all()
    assert list(user_ids) == sorted(user_ids)
    import pandas as pd

    table = pd.read_parquet(tmp_path / "emb" / PROFILES_FILE)
    assert list(table["user_id"]) == list(user_ids) and table["profile_text"].str.startswith("Persona:").all()
    assert np.allclose(np.stack(table["embedding"]), h)
    assert not (tmp_path / "emb" / "head.safetensors").exists()   # the MLP lives in the completion engine
    again = embed_recipe.main(args)  # deterministic, and the cached teacher is reused
    assert np.array_equal(load_user_embeddings(tmp_path / "emb" / EMBEDDINGS_FILE)[1], h) and again["users"] == 40
