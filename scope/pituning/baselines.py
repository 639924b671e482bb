"""LightGBM intent baseline on the PITuning split (paper appendix E features, Table 5 hyperparameters).

Features of one prediction point (appendix E: context, recent events, event statistics):

- context of the query: time slot, weekday, weekend flag, location rank, location POI cluster;
- the last 3 events (categorical) and how many of the history events share the query's slot;
- the counts of every event type among the last 30 events and among the last 5.

Decision: the paper's Table 5 values could not be consulted here; ``LGBM_PARAMS`` are the usual
multiclass GBDT settings that table lists (learning rate 0.05, 31 leaves, 200 trees, 80% row and
feature subsampling, L2 1.0). With few samples those settings cannot split (``min_child_samples``
20 per leaf, 31 leaves): the **small-data fallback** (fewer than ``small_data_rows`` rows) uses 7
leaves, 3 samples per leaf, 100 trees at learning rate 0.1, and a user with a single intent gets a
constant predictor. Intents a model never saw get score 0 (ranked last).
"""

from __future__ import annotations

import numpy as np
import torch

from scope.pituning.data import N_SPECIAL, IntentData, IntentSamples

LGBM_PARAMS = dict(objective="multiclass", boosting_type="gbdt", learning_rate=0.05, num_leaves=31, max_depth=-1,
                   n_estimators=200, min_child_samples=20, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                   reg_lambda=1.0, verbose=-1, n_jobs=1)
SMALL_DATA_PARAMS = dict(num_leaves=7, min_child_samples=3, n_estimators=100, learning_rate=0.1)
CATEGORICAL = ["slot", "weekday", "location", "cluster", "last_1", "last_2", "last_3"]


def features(samples: IntentSamples, n_events: int) -> tuple[np.ndarray, list[str]]:
    """Appendix-E feature matrix [N, F] and column names."""
    ev = samples.event[:, :-1].long().numpy() - N_SPECIAL            # history events, 0-based ids
    n_types = n_events - N_SPECIAL
    q = {f: getattr(samples, f)[:, -1].long().numpy() for f in ("slot", "weekday", "location", "cluster")}
    rows = np.arange(len(ev))[:, None]
    bag = np.zeros((len(ev), n_types))
    np.add.at(bag, (np.repeat(rows, ev.shape[1], 1), ev), 1)
    recent = np.zeros((len(ev), n_types))
    np.add.at(recent, (np.repeat(rows, 5, 1), ev[:, -5:]), 1)
    same_slot = (samples.slot[:, :-1].numpy() == samples.slot[:, -1:].numpy()).sum(1)
    columns = [q["slot"], q["weekday"], q["location"], q["cluster"], ev[:, -1], ev[:, -2], ev[:, -3],
               (q["weekday"] >= 5).astype(int), same_slot]
    names = CATEGORICAL + ["weekend", "same_slot_events"] + [f"bag_{i}" for i in range(n_types)] + \
        [f"recent_{i}" for i in range(n_types)]
    return np.column_stack(columns + [bag, recent]).astype(np.float32), names


def fit_predict(train: IntentSamples, test: IntentSamples, n_events: int, n_intents: int, *,
                small_data_rows: int = 300, seed: int = 0) -> tuple[np.ndarray, str]:
    """Train one LightGBM on ``train`` and score ``test``: (scores [N_test, N_I], which settings were used)."""
    import lightgbm as lgb
    y = train.intent.numpy()
    scores = np.zeros((len(test), n_intents))
    classes = np.unique(y)
    if len(classes) == 1:
        scores[:, classes[0]] = 1.0
        return scores, "constant"
    X, names = features(train, n_events)
    params = dict(LGBM_PARAMS, random_state=seed)
    mode = "table5"
    if len(y) < small_data_rows:
        params |= SMALL_DATA_PARAMS
        mode = "small_data"
    model = lgb.LGBMClassifier(**params)
    model.fit(X, y, categorical_feature=[names.index(c) for c in CATEGORICAL])
    scores[:, model.classes_] = model.predict_proba(features(test, n_events)[0])
    return scores, mode


def lightgbm_individual(data: IntentData, *, seed: int = 0, small_data_rows: int = 300) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One LightGBM per individual user (on-device, its own training data): pooled test scores and labels."""
    scores, labels, modes = [], [], {}
    for user_id in data.individual_users:
        train, test = data.individual["train"].of_user(user_id), data.individual["test"].of_user(user_id)
        if not len(test):
            continue
        s, mode = fit_predict(train, test, data.n_events, data.n_intents, small_data_rows=small_data_rows, seed=seed)
        scores.append(torch.from_numpy(s))
        labels.append(test.intent)
        modes[mode] = modes.get(mode, 0) + 1
    return torch.cat(scores), torch.cat(labels), modes


def lightgbm_pooled(data: IntentData, *, max_population_rows: int = 30000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One LightGBM on (a sample of) the population data plus every individual user's training data."""
    generator = torch.Generator().manual_seed(seed)
    pop = data.population_train
    pop = pop[torch.randperm(len(pop), generator=generator)[:max_population_rows]]
    train = IntentSamples.concat([pop, data.individual["train"]])
    test = data.individual["test"]
    s, _ = fit_predict(train, test, data.n_events, data.n_intents, seed=seed)
    return torch.from_numpy(s), test.intent
