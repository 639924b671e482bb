"""Per-user tensors -> Batch: normalised values, cluster one-hot cells, h_u by user id or the
documented cell-cluster-histogram default; cold-start app recommendation on hand-made cases."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from completion.recommend import app_channels, engagement, recommendation_report
from completion.tensors import BehaviourTensors
from completion.users import cluster_one_hot, load_embeddings, user_batch


def test_cluster_one_hot_gives_zeros_for_padding_cells():
    out = cluster_one_hot(np.array([[[2, -1], [0, 2]]]), 3)
    assert out.tolist() == [[[[0, 0, 1], [0, 0, 0]], [[1, 0, 0], [0, 0, 1]]]]
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_one_hot(np.array([[[3]]]), 3)


def test_user_batch_normalises_and_keeps_availability(user_tensors):
    tensors = BehaviourTensors(user_tensors, "train")
    batch, users = user_batch(tensors)
    arrays = tensors.arrays()
    N, C, T, H, W = arrays["x"].shape
    assert batch.x.shape == (N, C, T, H, W) and batch.cells.shape == (N, H, W, 6)
    assert torch.allclose(batch.x, torch.from_numpy(tensors.normalizer.transform(arrays["x"])))
    assert torch.equal(batch.observed, torch.from_numpy(arrays["available"]))
    assert np.array_equal(users, arrays["user_id"])
    # default h_u: the share of the user's H x W cells in each cluster (padding cells count 0)
    expected = (arrays["cell_cluster"][..., None] == np.arange(6)).mean((1, 2))
    assert np.allclose(batch.entity.numpy(), expected)
    assert batch.timestamps.dtype == torch.long and batch.timestamps[..., 1].max() < 96


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_embeddings_are_looked_up_by_user_id_and_unknown_users_get_zeros(user_tensors, tmp_path, suffix):
    tensors = BehaviourTensors(user_tensors, "train")
    users = np.unique(tensors.arrays()["user_id"])
    known = users[:-1]  # the last user has no embedding
    table = {"user_id": known.astype(np.int64), "embedding": np.arange(len(known) * 3, dtype=np.float32).reshape(-1, 3)}
    path = tmp_path / f"h{suffix}"
    np.savez(path, **table) if suffix == ".npz" else save_file(table, str(path))
    with pytest.warns(UserWarning, match="without an embedding"):
        batch, item_users = user_batch(tensors, load_embeddings(path))
    for i, u in enumerate(item_users):
        row = np.flatnonzero(known == u)
        expected = table["embedding"][row[0]] if len(row) else np.zeros(3)
        assert np.array_equal(batch.entity[i].numpy(), expected)


def test_malformed_embedding_files_are_clear_errors(tmp_path):
    np.savez(tmp_path / "a.npz", user_id=np.arange(3))
    with pytest.raises(ValueError, match="missing arrays \\['embedding'\\]"):
        load_embeddings(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", user_id=np.arange(3), embedding=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="N = len"):
        load_embeddings(tmp_path / "b.npz")
    with pytest.raises(ValueError, match=".npz or .safetensors"):
        load_embeddings(tmp_path / "c.csv")


def test_engagement_sums_predicted_usage_over_the_target_footprint():
    values = torch.zeros(1, 3, 4, 1, 1)
    values[0, 0, 3] = 5.0  # app A, target slot
    values[0, 1, 0] = 9.0  # app B, history slot only: not counted
    values[0, 1, 2] = 1.0
    target = torch.zeros(1, 3, 4, 1, 1, dtype=torch.bool)
    target[:, :, 2:] = True
    assert engagement(values, target, [0, 1]).tolist() == [[5.0, 1.0]]
    assert app_channels(["app:A", "app:B", "presence"]) == [0, 1]
    with pytest.raises(ValueError, match="no app-category channel"):
        app_channels(["traffic", "users"])


def test_recommendation_scores_a_hand_made_ranking():
    # two users, three app categories, one target slot; channel 3 is presence (ignored)
    pred = torch.tensor([[3.0, 2.0, 1.0, 7.0], [1.0, 2.0, 3.0, 7.0]]).reshape(2, 4, 1, 1, 1)
    truth = torch.tensor([[0.0, 4.0, 0.0, 1.0], [0.0, 0.0, 2.0, 1.0]]).reshape(2, 4, 1, 1, 1)
    target = torch.ones(2, 4, 1, 1, 1, dtype=torch.bool)
    out = recommendation_report(pred, truth, target, [0, 1, 2])
    # user 0 ranks [A, B, C], uses B: hit at rank 2; user 1 ranks [C, B, A], uses C: hit at rank 1
    assert out["recall@1"] == 0.5 and out["recall@3"] == 1.0
    assert out["mrr@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["ndcg@3"] == pytest.approx((1 / np.log2(3) + 1) / 2)
    assert out["users_scored"] == 2


def _users_with_levels(n_users, windows=2, seed=0):
    """Windows whose channel levels are a linear function of each user's 5-d entity vector."""
    from dataclasses import replace

    from tests.completion.conftest import random_batch

    g = torch.Generator().manual_seed(seed)
    entity = torch.randn(n_users, 5, generator=g)
    level = entity @ torch.randn(5, 2, generator=torch.Generator().manual_seed(99))  # [users, C], one map for all
    users = np.repeat(np.arange(n_users), windows)
    batch = random_batch(B=len(users), C=2, T=8, H=2, W=2, entity_dim=5, seed=seed)
    x = 0.1 * batch.x + level[users][:, :, None, None, None]
    return replace(batch, x=x, entity=entity[users]), users


def test_user_statistics_are_per_user_means_of_observed_entries():
    from completion.users import user_statistics

    batch, users = _users_with_levels(4)
    batch.observed[0, :4] = False
    ids, stats, main = user_statistics(batch, users, slots_per_day=96)
    assert main == 2 and ids.tolist() == [0, 1, 2, 3] and stats.shape == (4, 2 + 4 * 2 + 4)
    obs = batch.observed[:2].float()[:, None]
    expected = (batch.x[:2] * obs).sum((0, 2, 3, 4)) / obs.expand_as(batch.x[:2]).sum((0, 2, 3, 4))
    assert np.allclose(stats[0, :2], expected.numpy(), atol=1e-5)
    assert np.isnan(stats[:, 2 + 2 * 2:2 + 4 * 2]).all()  # the windows never reach the third quarter of the day


def test_the_probe_reads_behaviour_from_an_embedding_that_encodes_it_and_not_from_noise():
    from completion.users import embedding_probe

    train, held_out = _users_with_levels(60, seed=1), _users_with_levels(20, seed=2)
    held_out = (held_out[0], held_out[1] + 1000)  # other users, the same map from entity to levels
    informative = embedding_probe(lambda e: e, train, held_out, 96)
    assert informative["sbert"]["main"] > 0.9 and informative["h_u"]["main"] > 0.9
    assert informative["train_users"] == 60 and informative["held_out_users"] == 20
    noise = torch.Generator().manual_seed(5)
    scrambled = embedding_probe(lambda e: torch.randn(e.shape[0], 8, generator=noise), train, held_out, 96)
    assert scrambled["h_u"]["main"] < 0.2


def test_the_probe_refuses_too_few_users():
    from completion.users import probe_r2

    with pytest.raises(ValueError, match="at least 3 train and 2 held-out users"):
        probe_r2({"x": np.zeros((3, 2))}, np.zeros((3, 1)), np.array([True, True, False]), 1)
