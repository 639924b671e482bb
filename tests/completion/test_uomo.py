"""UoMo's protocol: scale statistics from the train split only, an exact inverse, the project's and
UoMo's code's readings of the error, the same-area lookup, the fit / report halves of a week, and
the converter from UoMo's released files (round trip on a tiny folder in UoMo's format)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from completion.batch import Batch
from completion.city import load_city
from completion.uomo import UOMO_TASKS, SameAreaLookup, UoMoScaler, main, time_halves, uomo_errors


def test_statistics_come_from_train_only_and_the_inverse_is_exact():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(50, 2, 8, 2, 2, generator=g) * torch.tensor([1000.0, 10.0])[None, :, None, None, None]
    scaler = UoMoScaler.fit(train)
    other = torch.rand(5, 2, 8, 2, 2, generator=g) * 1e6  # another split, far larger: must not move the statistics
    assert torch.equal(UoMoScaler.fit(train).clip, scaler.clip)
    assert scaler.clip[0] == pytest.approx(torch.quantile(train[:, 0].flatten().double(), 0.9999).item(), rel=1e-5)
    z = scaler.transform(train)
    assert z.min() >= -1 - 1e-6 and z.max() <= 1 + 1e-6
    assert torch.allclose(scaler.inverse(scaler.transform(other)), scaler.clipped(other), atol=1e-6)
    assert torch.allclose(scaler.inverse(z), scaler.clipped(train), atol=1e-6)
    assert (scaler.clipped(other) <= 1).all()  # values above the train clip are clipped
    with pytest.raises(ValueError, match="must be positive"):
        UoMoScaler.fit(torch.zeros(3, 1, 4, 1, 1))


def test_the_projects_reading_and_uomos_two():
    scaler = UoMoScaler(clip=torch.tensor([10.0]), low=torch.tensor([0.0]), high=torch.tensor([1.0]))
    truth = torch.zeros(1, 1, 4, 1, 1)
    pred = torch.tensor([0.0, 0.0, 2.0, 4.0]).reshape(1, 1, 4, 1, 1)  # errors 0.2 and 0.4 on the last two
    target = torch.tensor([False, False, True, True]).reshape(1, 1, 4, 1, 1)
    err = uomo_errors(pred, truth, target, scaler)
    assert err["rmse"][0] == pytest.approx(((0.04 + 0.16) / 2) ** 0.5)  # target entries, [0, 1]
    assert err["mae"][0] == pytest.approx(0.3)
    assert err["rmse_masked_pm1"][0] == pytest.approx(2 * ((0.04 + 0.16) / 2) ** 0.5)  # [-1, 1] doubles it
    assert err["rmse_all_pm1"][0] == pytest.approx(2 * ((0.04 + 0.16) / 4) ** 0.5)  # divided by every entry


def test_the_tasks_are_uomos():
    assert (UOMO_TASKS.short_horizon, UOMO_TASKS.long_horizon, UOMO_TASKS.cold_hidden_cells) == (16, 48, 0.25)


def windows(starts, T, spd=4) -> torch.Tensor:
    """(weekday, slot of day) of windows of T steps starting at the given slots of the week."""
    absolute = torch.tensor(starts)[:, None] + torch.arange(T)
    return torch.stack([(absolute // spd) % 7, absolute % spd], -1)


def test_the_lookup_copies_the_same_area_at_the_same_slot_of_day():
    T, spd = 3, 4
    starts = list(range(7 * spd)) * 2  # two areas, a window at every slot of the week
    area = torch.tensor([0] * 28 + [1] * 28)
    x = torch.arange(56, dtype=torch.float32)[:, None, None, None, None].expand(56, 1, T, 1, 1)
    train = Batch(x=x, observed=torch.ones(56, T, 1, 1, dtype=torch.bool), entity=area[:, None].float(),
                  cells=torch.zeros(56, 1, 1, 1), timestamps=windows(starts, T))
    lookup = SameAreaLookup().fit(train, spd)
    # area 1 starting on day 2 at slot 3 -> that very window; area 0 at slot 1 of day 6 -> row 25
    val = Batch(x=torch.zeros(2, 1, T, 1, 1), observed=torch.ones(2, T, 1, 1, dtype=torch.bool),
                entity=torch.tensor([[1.0], [0.0]]), cells=torch.zeros(2, 1, 1, 1),
                timestamps=windows([2 * spd + 3, 6 * spd + 1], T))
    pred = lookup.predict(val, None, None)
    assert pred[:, 0, 0, 0, 0].tolist() == [28 + 11, 25]
    days_0_to_2 = SameAreaLookup().fit(train[:12], spd)  # area 0, days 0-2 only: day 5 is nearest to day 0
    assert days_0_to_2.predict(replace(val[1:], timestamps=windows([5 * spd + 2], T)), None, None).max() == 2
    with pytest.raises(ValueError, match="training areas"):
        lookup.predict(replace(val, entity=torch.tensor([[5.0], [0.0]])), None, None)


def test_the_fit_and_report_halves_share_no_step():
    spd, T = 96, 64
    ts = windows(list(range(7 * spd)), T, spd)[torch.randperm(7 * spd, generator=torch.Generator().manual_seed(0))]
    fit, report = time_halves(ts, spd)
    start = ts[:, 0, 0] * spd + ts[:, 0, 1]
    assert (len(fit), len(report)) == (304, 305)
    assert start[fit].max() + T - 1 < start[report].min()  # the last fit window ends before the first reported


def write_uomo_folder(folder, g):
    """A tiny city in UoMo's released format (dataset64time/*.json once extracted) -> its arrays."""
    sizes, T, H, W, P = {"train": 5, "val": 2, "test": 2}, 8, 2, 2, 3
    arrays = {}
    for s, n in sizes.items():
        arrays[f"traffic_{s}"] = rng_values(g, (n, T, H, W), 1e5)
        arrays[f"users_{s}"] = rng_values(g, (n, T, H, W), 50)
        arrays[f"poi_{s}"] = np.floor(rng_values(g, (n, P, H, W), 20))
        arrays[f"ts_{s}"] = windows(list(range(n)), T).numpy()
    for kind, name in (("traffic", "24_TrafficXX_short64.json"), ("users", "TrafficXX_user64.json")):
        data = {f"X_{s}": [arrays[f"{kind}_{s}"].tolist()] for s in sizes}
        data["timestamps"] = {s: arrays[f"ts_{s}"].tolist() for s in sizes}
        (folder / name).write_text(json.dumps(data))
    (folder / "TrafficXX_poi64.json").write_text(json.dumps({f"X_{s}": arrays[f"poi_{s}"].tolist() for s in sizes}))
    return arrays


def rng_values(g, shape, scale):
    return (g.random(shape) * scale * (g.random(shape) > 0.4)).round(3)  # zero-inflated, as NJ


def test_convert_round_trip(tmp_path, capsys):
    source = tmp_path / "dataset64time"
    source.mkdir()
    arrays = write_uomo_folder(source, np.random.default_rng(0))
    out = tmp_path / "city.npz"
    main(["convert", "--source", str(source), "--output", str(out), "--city", "TrafficXX"])
    assert str(out) in capsys.readouterr().out
    with np.load(out) as f:
        for s in ("train", "val", "test"):
            X, ts, poi = f[f"X_{s}"], f[f"timestamps_{s}"], f[f"poi_{s}"]
            n = len(arrays[f"ts_{s}"])
            assert (X.shape, ts.shape, poi.shape) == ((n, 2, 8, 2, 2), (n, 8, 2), (n, 3, 2, 2))
            assert (X.dtype, ts.dtype, poi.dtype) == (np.float32, np.int16, np.float32)
            assert np.array_equal(X[:, 0], arrays[f"traffic_{s}"].astype(np.float32))
            assert np.array_equal(X[:, 1], arrays[f"users_{s}"].astype(np.float32))
            assert np.array_equal(ts, arrays[f"ts_{s}"]) and np.array_equal(poi, arrays[f"poi_{s}"])
    city = load_city(out)
    assert city.slots_per_day == 4 and torch.equal(city.raw["val"], torch.from_numpy(np.load(out)["X_val"]))


def test_a_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="TrafficNJ_user64.json"):
        main(["convert", "--source", str(tmp_path), "--output", str(tmp_path / "nj.npz")])
    with pytest.raises(ValueError, match="tsinghua-fib-lab/UoMo.*python -m completion.uomo convert"):
        load_city(tmp_path / "nj_traffic_users_64.npz")


def test_a_city_in_uomos_scale(nj_path):
    city = load_city(nj_path, normalization="uomo")
    x = city.batches["train"].x
    assert x.min() == -1 and x.max() == 1
    raw = city.raw["val"][:4]
    back = city.inverse(city.batches["val"].x[:4])
    assert torch.allclose(city.scaler.clipped(back), city.scaler.clipped(raw), atol=1e-6)  # float32 of ~1e6
    with pytest.raises(ValueError, match="unknown normalization"):
        load_city(nj_path, normalization="zscore")


def test_njs_val_and_test_are_training_areas_that_the_lookup_finds(nj_path):
    city = load_city(nj_path, normalization="uomo")
    lookup = SameAreaLookup().fit(city.batches["train"], city.slots_per_day)
    for split in ("val", "test"):
        batch = city.batches[split][:8]
        pred = lookup.predict(batch, None, None)
        assert pred.shape == batch.x.shape and not torch.equal(pred, batch.x)  # the same place, other hours
