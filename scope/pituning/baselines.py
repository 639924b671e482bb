"""Intent baselines on the PITuning split: LightGBM as the paper ran it (appendix E, Table 5), pooled and
per user, and the most frequent intent per (user, time slot).

**LightGBM** (Table 5): multiclass GBDT, 2000 iterations, 32 leaves, no depth limit, 20 samples
per leaf, all features, no L1 / L2, random state 42, early stopping after 75 rounds without
improvement of the validation log-loss; with fewer than 200 training samples the paper's
small-data setting (depth 3, 3 leaves, L1 = L2 = 1). Table 5 gives no learning rate: LightGBM's
default 0.1. A user with one training intent gets a constant predictor, one with two the binary
objective (LightGBM's multiclass needs three classes). Intents a model never
saw get score 0 (ranked last); validation points of such intents are left out of early stopping.

Features of one prediction point (appendix E; Decision: the paper's first group, GPT-2's output
probabilities, is left out so that the baseline does not depend on the model it is compared
with; times are counted in records, the unit of the history):

- context: the query's time slot, weekday, weekend flag, and morning / afternoon / evening;
- position: location rank and POI cluster of the query (0 when hidden) and of the last 3 records,
  whether the last record is at one of the user's top locations;
- events: the last 3 events, the counts of every event among the last 30 and the last 5, and
  for every event ``T_0`` (records since its last occurrence) and ``T_1`` (records between its
  last two occurrences; Eq. 17-18, 31 when absent); the counts of every POI cluster among the
  last 30 records.

``routine=True`` (not the paper's baseline: the control for PITuning's routine prior) appends the
user's routine ``log p(intent | user, slot)`` (:func:`scope.pituning.data.routine_prior`), one
column per intent, so that LightGBM gets the same information as the neural models.
"""

from __future__ import annotations

import numpy as np
import torch

from scope.pituning.data import N_SPECIAL, IntentData, IntentSamples

# Measured with LightGBM 4.7: refitting one user's small-data model (early-stopped on its ~15 validation
# points) on the same arrays in one process gives different best iterations and scores from fit to
# fit, even with LightGBM's ``deterministic=True, force_row_wise=True``; the pooled model reproduces exactly.
# The benchmark therefore repeats the per-user baseline and reports its spread.
TABLE5_PARAMS = dict(objective="multiclass", boosting_type="gbdt", n_estimators=2000, num_leaves=32, max_depth=-1,
                     min_child_samples=20, colsample_bytree=1.0, reg_alpha=0.0, reg_lambda=0.0, random_state=42,
                     verbose=-1, n_jobs=1)
SMALL_DATA_PARAMS = dict(max_depth=3, num_leaves=3, reg_alpha=1.0, reg_lambda=1.0)
SMALL_DATA_ROWS = 200
EARLY_STOPPING_ROUNDS = 75
CATEGORICAL = ["slot", "weekday", "location", "cluster", "last_1", "last_2", "last_3",
               "location_1", "location_2", "location_3", "cluster_1", "cluster_2", "cluster_3"]


def _since(ev: np.ndarray, n_types: int) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 17-18 in records: per event type, records since its last and between its last two occurrences."""
    L = ev.shape[1]
    age = L - np.arange(L)                                    # the last history record is 1 record ago
    hit = ev[:, :, None] == np.arange(n_types)[None, None, :]  # [N, L, E]
    ages = np.where(hit, age[None, :, None], L + 1)
    t0 = ages.min(1)
    second = np.sort(ages, axis=1)[:, 1]
    t1 = np.where(second <= L, second - t0, L + 1)
    return t0, t1


def features(samples: IntentSamples, n_events: int, n_clusters: int, routine: bool = False
             ) -> tuple[np.ndarray, list[str]]:
    """Appendix-E feature matrix [N, F] and column names (module docstring); ``routine`` appends the
    routine prior's columns."""
    ev = samples.event[:, :-1].long().numpy() - N_SPECIAL            # history events, 0-based ids
    n_types = n_events - N_SPECIAL
    q = {f: getattr(samples, f)[:, -1].long().numpy() for f in ("slot", "weekday", "location", "cluster")}
    loc, clu = samples.location[:, :-1].long().numpy(), samples.cluster[:, :-1].long().numpy()
    rows = np.arange(len(ev))[:, None]
    bag = np.zeros((len(ev), n_types))
    np.add.at(bag, (np.repeat(rows, ev.shape[1], 1), ev), 1)
    recent = np.zeros((len(ev), n_types))
    np.add.at(recent, (np.repeat(rows, 5, 1), ev[:, -5:]), 1)
    places = np.zeros((len(ev), n_clusters))
    np.add.at(places, (np.repeat(rows, clu.shape[1], 1), clu), 1)
    t0, t1 = _since(ev, n_types)
    n_slots = int(samples.slot.max()) + 1 if len(samples) else 1
    part_of_day = np.digitize(q["slot"] * 24 // max(n_slots, 1), [12, 18])
    columns = [q["slot"], q["weekday"], q["location"], q["cluster"], ev[:, -1], ev[:, -2], ev[:, -3],
               loc[:, -1], loc[:, -2], loc[:, -3], clu[:, -1], clu[:, -2], clu[:, -3],
               (q["weekday"] >= 5).astype(int), part_of_day, (loc[:, -1] <= 3).astype(int)]
    names = CATEGORICAL + ["weekend", "part_of_day", "at_top_location"] + [f"bag_{i}" for i in range(n_types)] + \
        [f"recent_{i}" for i in range(n_types)] + [f"T0_{i}" for i in range(n_types)] + \
        [f"T1_{i}" for i in range(n_types)] + [f"cluster_count_{i}" for i in range(n_clusters)]
    extra = []
    if routine:
        extra = [samples.routine.numpy()]
        names = names + [f"routine_{i}" for i in range(samples.routine.shape[1])]
    return np.column_stack(columns + [bag, recent, t0, t1, places] + extra).astype(np.float32), names


def fit_predict(train: IntentSamples, val: IntentSamples, test: IntentSamples, n_events: int, n_clusters: int,
                n_intents: int, routine: bool = False) -> tuple[np.ndarray, str]:
    """One Table-5 LightGBM on ``train``, early-stopped on ``val``: (scores [N_test, N_I], setting used);
    ``routine``: with the routine prior's features."""
    import lightgbm as lgb
    y = train.intent.numpy()
    scores = np.zeros((len(test), n_intents))
    classes = np.unique(y)
    if len(classes) == 1:
        scores[:, classes[0]] = 1.0
        return scores, "constant"
    X, names = features(train, n_events, n_clusters, routine)
    small = len(y) < SMALL_DATA_ROWS
    params = TABLE5_PARAMS | (SMALL_DATA_PARAMS if small else {})
    if len(classes) == 2:   # LightGBM's multiclass objective needs 3+ classes; two intents are its binary case
        params["objective"] = "binary"
    model = lgb.LGBMClassifier(**params)
    seen = np.isin(val.intent.numpy(), classes)
    fit_args = {}
    if seen.any():
        fit_args = dict(eval_X=(features(val[torch.from_numpy(seen)], n_events, n_clusters, routine)[0],),
                        eval_y=(val.intent.numpy()[seen],),
                        callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)])
    model.fit(X, y, categorical_feature=[names.index(c) for c in CATEGORICAL], **fit_args)
    scores[:, model.classes_] = model.predict_proba(features(test, n_events, n_clusters, routine)[0])
    return scores, "small_data" if small else "table5"


def lightgbm_individual(data: IntentData) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One LightGBM per individual user (on-device, its own data): pooled test scores, labels, settings used."""
    scores, labels, modes = [], [], {}
    for user_id in data.individual_users:
        train, val, test = (data.individual[s].of_user(user_id) for s in ("train", "val", "test"))
        if not len(test):
            continue
        s, mode = fit_predict(train, val, test, data.n_events, data.n_clusters, data.n_intents)
        scores.append(torch.from_numpy(s))
        labels.append(test.intent)
        modes[mode] = modes.get(mode, 0) + 1
    return torch.cat(scores), torch.cat(labels), modes


def lightgbm_pooled(data: IntentData, test: IntentSamples, routine: bool = False) -> tuple[torch.Tensor, IntentSamples]:
    """One LightGBM on the population data plus every individual user's training data, early-stopped on
    the population and individual validation points; scores of ``test`` (``routine``: with the routine
    prior's features)."""
    train = IntentSamples.concat([data.population_train, data.individual["train"]])
    val = IntentSamples.concat([data.population_val, data.individual["val"]])
    s, _ = fit_predict(train, val, test, data.n_events, data.n_clusters, data.n_intents, routine)
    return torch.from_numpy(s), test


def lightgbm_population(data: IntentData, routine: bool = False) -> torch.Tensor:
    """The population-only LightGBM (the teacher's yardstick before distillation), early-stopped on the
    first half of the population validation points: scores of the second half
    (:func:`scope.pituning.data.IntentData.population_val_halves`)."""
    select, held_out = data.population_val_halves()
    s, _ = fit_predict(data.population_train, select, held_out, data.n_events, data.n_clusters, data.n_intents, routine)
    return torch.from_numpy(s)


def most_frequent_per_slot(data: IntentData, test: IntentSamples) -> torch.Tensor:
    """Scores of each user's most frequent training intent in the query's time slot (ties and unseen slots:
    the user's overall frequency), one of the simplest on-device predictors."""
    train = data.individual["train"]
    n_slots, n_i = data.n_slots, data.n_intents
    key = lambda s: s.user * n_slots + s.slot[:, -1].long()  # noqa: E731
    per_slot = {}
    per_user = {}
    for k, u, y in zip(key(train).tolist(), train.user.tolist(), train.intent.tolist()):
        per_slot.setdefault(k, torch.zeros(n_i))[y] += 1
        per_user.setdefault(u, torch.zeros(n_i))[y] += 1
    scores = torch.zeros(len(test), n_i)
    for row, (k, u) in enumerate(zip(key(test).tolist(), test.user.tolist())):
        scores[row] = per_slot.get(k, torch.zeros(n_i)) + 1e-3 * per_user.get(u, torch.zeros(n_i))
    return scores
