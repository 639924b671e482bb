"""Per-user behaviour tensors (`completion.tensors.BehaviourTensors`) -> `Batch`.

- x: the tensors normalised by the cohort's own train-fitted `Log1pStandardizer`;
  observed: the `available` mask (days with records x real cells).
- cells: one-hot of each cell's location cluster, [H, W, n_clusters]; padding cells
  (cluster -1) are all zeros. This is the source of E_pos.
- entity: the input of h_u (Eq. 24), a row of an embedding matrix keyed by user id (`load_embeddings`:
  an `.npz` or `.safetensors` file with `user_id` [N] and `embedding` [N, d]; recipes/embed.py writes
  the frozen SBERT encoding of each profile). The model's entity MLP standardises and maps it to
  h_u, trained with the DiT (`completion.dit.EntityEmbedder`). Without a matrix, the documented
  default is the user's cell-cluster histogram (the share of the user's H x W cells in each
  cluster), static side information that never sees the behaviour values. Users missing from a
  given matrix get zeros, and are counted.

An engine is trained with one embedding matrix: `save_entity_reference` keeps its rows (every user
of the file: the train users whose rows fitted the MLP's standardisation, and the held-out users it
was scored on) beside the checkpoint, and `check_entity_reference` refuses a matrix whose rows for
those users differ (another encoder, pooling or profile source), so an engine never silently reads
embeddings it was not trained with. Users added since (a new user's profile) pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from completion.batch import Batch
from completion.tensors import BehaviourTensors


@dataclass(frozen=True)
class Embeddings:
    user_id: np.ndarray  # int64 [N]
    embedding: np.ndarray  # float32 [N, d]

    def lookup(self, users: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows for `users` (zeros for unknown ids) and the number of unknown ids."""
        index = {int(u): i for i, u in enumerate(self.user_id)}
        rows = np.array([index.get(int(u), -1) for u in users])
        out = np.zeros((len(users), self.embedding.shape[1]), np.float32)
        out[rows >= 0] = self.embedding[rows[rows >= 0]]
        return out, int((rows < 0).sum())


def load_embeddings(path: str | Path) -> Embeddings:
    """Read `user_id` [N] and `embedding` [N, d] from an .npz or .safetensors file."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    elif path.suffix == ".safetensors":
        arrays = load_file(str(path))
    else:
        raise ValueError(f"{path}: embeddings must be an .npz or .safetensors file")
    missing = {"user_id", "embedding"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}; expected 'user_id' [N] and 'embedding' [N, d]")
    user_id, embedding = arrays["user_id"].astype(np.int64), arrays["embedding"].astype(np.float32)
    if embedding.ndim != 2 or len(embedding) != len(user_id):
        raise ValueError(f"{path}: embedding must be [N, d] with N = len(user_id) = {len(user_id)}, "
                         f"got {embedding.shape}")
    return Embeddings(user_id, embedding)


REFERENCE_FILE = "entity_reference.safetensors"


def save_entity_reference(path: str | Path, user_id: np.ndarray, entity: np.ndarray) -> None:
    """The entity rows of an engine's embedding matrix (one per user), written atomically to `path`."""
    from scope.io import atomic_path

    users, first = np.unique(np.asarray(user_id, np.int64), return_index=True)
    with atomic_path(Path(path)) as tmp:
        save_file({"user_id": users, "entity": np.ascontiguousarray(entity[first], dtype=np.float32)}, str(tmp))


def check_entity_reference(path: str | Path, user_id: np.ndarray, entity: np.ndarray, source: str,
                           atol: float = 1e-4) -> None:
    """Raise when the rows of `entity` for users in the reference at `path` are not the ones the engine
    was trained on (or have another width)."""
    reference = load_file(str(path))
    if reference["entity"].shape[1] != entity.shape[1]:
        raise ValueError(f"{source}: {entity.shape[1]}-d user embeddings, but the engine beside {path} was trained on "
                         f"{reference['entity'].shape[1]}-d ones")
    index = {int(u): i for i, u in enumerate(reference["user_id"])}
    rows = np.array([index.get(int(u), -1) for u in user_id])
    known = rows >= 0
    if known.any():
        gaps = np.abs(entity[known] - reference["entity"][rows[known]]).max(1)
        if gaps.max() > atol:
            differing = len(set(np.asarray(user_id)[known][gaps > atol].tolist()))
            raise ValueError(f"{source}: the embeddings of {differing} users differ from those the engine beside {path} "
                             f"was trained on (max difference {gaps.max():.3g}): another embed output (encoder, pooling "
                             "or profiles). Pass the embeddings the engine was trained with, or retrain it "
                             "(`complete.py train`)")


def cluster_count(tensors: BehaviourTensors) -> int:
    """Number of location clusters: from dataset.json's metadata, else the largest label + 1."""
    names = tensors.meta.get("meta", {}).get("location_clusters", {}).get("names")
    if names:
        return len(names)
    return int(tensors.arrays()["cell_cluster"].max()) + 1


def cluster_one_hot(cell_cluster: np.ndarray, n_clusters: int) -> np.ndarray:
    """[N, H, W] int labels (-1 = none) -> [N, H, W, n_clusters] one-hot, zeros for -1."""
    if cell_cluster.max(initial=-1) >= n_clusters:
        raise ValueError(f"cluster label {cell_cluster.max()} >= n_clusters {n_clusters}")
    eye = np.vstack([np.eye(n_clusters, dtype=np.float32), np.zeros((1, n_clusters), np.float32)])
    return eye[np.where(cell_cluster < 0, n_clusters, cell_cluster)]


def user_batch(tensors: BehaviourTensors, embeddings: Embeddings | None = None,
               n_clusters: int | None = None) -> tuple[Batch, np.ndarray]:
    """Every selected (user, window) item as one normalised Batch, and the items' user ids."""
    arrays = tensors.arrays()
    n_clusters = cluster_count(tensors) if n_clusters is None else n_clusters
    cells = cluster_one_hot(arrays["cell_cluster"], n_clusters)
    if embeddings is None:
        entity = cells.mean((1, 2))
    else:
        entity, unknown = embeddings.lookup(arrays["user_id"])
        if unknown:
            warnings.warn(f"{unknown} of {len(entity)} items belong to users without an embedding; "
                          "their entity vector is zero", stacklevel=2)
    batch = Batch(
        x=torch.from_numpy(tensors.normalizer.transform(arrays["x"].astype(np.float32))),
        observed=torch.from_numpy(arrays["available"].astype(bool)),
        entity=torch.from_numpy(np.ascontiguousarray(entity, dtype=np.float32)),
        cells=torch.from_numpy(cells),
        timestamps=torch.from_numpy(arrays["timestamps"].astype(np.int64)),
    )
    return batch, arrays["user_id"]


# -- what an embedding encodes ------------------------------------------------------------------

def user_statistics(batch: Batch, users: np.ndarray, slots_per_day: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per user, over its windows' observed entries (normalised units): the mean of every channel
    (the `main` statistics), of every channel in each quarter of the day, and of every cell (all
    channels) -> (user ids, [N, C + 4C + HW], C). A statistic the user never observed is NaN."""
    _, C, T, H, W = batch.x.shape
    ids, owner = np.unique(users, return_inverse=True)
    owner = torch.from_numpy(owner)
    obs = batch.observed.float()[:, None]  # [B, 1, T, H, W]
    quarter = (batch.timestamps[..., 1] * 4 // slots_per_day).long()  # [B, T]
    parts = [((batch.x * obs).sum((2, 3, 4)), obs.expand_as(batch.x).sum((2, 3, 4)))]   # channel means
    for q in range(4):
        w = obs * (quarter == q).float()[:, None, :, None, None]
        parts.append(((batch.x * w).sum((2, 3, 4)), w.expand_as(batch.x).sum((2, 3, 4))))
    parts.append(((batch.x * obs).sum((1, 2)).flatten(1), obs.expand_as(batch.x).sum((1, 2)).flatten(1)))
    sums = torch.cat([p[0] for p in parts], 1)
    counts = torch.cat([p[1] for p in parts], 1)
    user_sums = torch.zeros(len(ids), sums.shape[1]).index_add_(0, owner, sums)
    user_counts = torch.zeros(len(ids), sums.shape[1]).index_add_(0, owner, counts)
    with np.errstate(invalid="ignore"):
        return ids, (user_sums / user_counts).numpy(), C


def probe_r2(features: dict[str, np.ndarray], targets: np.ndarray, train: np.ndarray, main: int) -> dict:
    """Whether an embedding encodes behaviour: the held-out R^2 of a ridge probe (alpha by CV on the
    `train` rows, features standardised on them) from each [N, d] feature matrix to the users'
    statistics [N, K] (`user_statistics`; NaN -> 0), scored on the other rows: over the first `main`
    columns (the channel means) and over `all` columns, uniform over columns that vary in train."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    targets, test = np.nan_to_num(targets), ~train
    if train.sum() < 3 or test.sum() < 2:
        raise ValueError(f"a probe needs at least 3 train and 2 held-out users, got {train.sum()} and {test.sum()}")
    keep = targets[train].std(0) > 1e-8
    main_cols = int(keep[:main].sum())
    out = {}
    for name, X in features.items():
        scaler = StandardScaler().fit(X[train])
        ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(scaler.transform(X[train]), targets[train][:, keep])
        pred, truth = ridge.predict(scaler.transform(X[test])), targets[test][:, keep]
        out[name] = {"main": round(float(r2_score(truth[:, :main_cols], pred[:, :main_cols])), 4),
                     "all": round(float(r2_score(truth, pred)), 4), "alpha": float(ridge.alpha_)}
    return out


def embedding_probe(embed, train: tuple[Batch, np.ndarray], held_out: tuple[Batch, np.ndarray],
                    slots_per_day: int) -> dict:
    """`probe_r2` of the raw entity vectors (`sbert`) and of `embed(entity)` (`h_u`, e.g. a trained
    model's `dit.entity_embedder`) to the statistics of each user's windows, fitted on the users of
    `train` and scored on those of `held_out` ((batch, user ids) pairs), plus the user counts."""
    rows, ids, stats, is_train = [], [], [], []
    for (batch, users), flag in ((train, True), (held_out, False)):
        uid, values, n_main = user_statistics(batch, users, slots_per_day)
        first = np.array([np.flatnonzero(users == u)[0] for u in uid])
        rows.append(batch.entity[torch.from_numpy(first)])
        ids.append(uid), stats.append(values), is_train.append(np.full(len(uid), flag))
    entity = torch.cat(rows)
    with torch.no_grad():
        h = embed(entity).numpy()
    is_train = np.concatenate(is_train)
    out = probe_r2({"h_u": h, "sbert": entity.numpy()}, np.concatenate(stats), is_train, n_main)
    return out | {"train_users": int(is_train.sum()), "held_out_users": int((~is_train).sum())}
