"""recipes/complete.py end to end through its real entry point: train (TensorBoard, checkpoints,
resume), evaluate (metrics JSON, Fig. 8/9 PNGs), predict (safetensors), on NJ and on per-user
tensors; every YAML config parses."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from completion.train import CHECKPOINT, load_model
from recipes import complete

CONFIGS = sorted((Path(complete.__file__).parent / "configs").glob("complete_*.yaml"))
TINY = ["--preset", "tiny", "--patch_size", "4", "2", "2", "--d", "8", "--bank_size", "16",
        "--diffusion_steps", "20", "--batch_size", "4", "--n_samples", "2", "--sampler_steps", "3",
        "--log_every", "1", "--checkpoint_every", "2", "--max_entities", "6"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config):
    cfg = complete.parse(["--config", str(config)])
    assert cfg.task.short_horizon == 4


def test_unknown_keys_and_commands_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: nj\nstepz: 3\n")
    with pytest.raises((ValueError, SystemExit)):
        complete.main(["train", "--config", str(bad)])
    with pytest.raises(SystemExit, match="usage"):
        complete.main(["fit", "--config", str(CONFIGS[0])])
    with pytest.raises(SystemExit, match="unknown data"):
        complete.main(["train", "--config", str(CONFIGS[0]), "--data", "csv"])


def run(command, run_dir, *extra, config="complete_nj.yaml", data_path=None):
    argv = [command, "--config", str(Path(complete.__file__).parent / "configs" / config), "--output_dir", str(run_dir),
            *TINY, *extra]
    if data_path is not None:
        argv += ["--data_path", str(data_path)]
    return complete.main(argv)


def test_nj_train_resume_evaluate_predict(nj_path, tmp_path):
    run("train", tmp_path, "--steps", "2", data_path=nj_path)  # "interrupted" after 2 of 4 steps
    assert json.loads((tmp_path / "args.json").read_text())["steps"] == 2
    summary = run("train", tmp_path, "--steps", "4", data_path=nj_path)
    assert summary["steps_run"] == 2  # resumed at step 2
    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as f:
        assert f.metadata()["step"] == "4"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    report = run("evaluate", tmp_path, data_path=nj_path)
    saved = json.loads((tmp_path / "eval_nj_traffic_users_64_test.json").read_text())
    assert saved["tasks"]["short"]["rmse"] == report["short"]["rmse"]
    assert all(v > 0 for t in ("short", "long") for v in report[t]["rmse_orig"])
    for name in ("masks_nj_traffic_users_64_test.png", "fpat_nj_traffic_users_64_test.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run("predict", tmp_path, "--evidence", "available", data_path=nj_path)
    with safe_open(str(tmp_path / "predictions_nj_traffic_users_64_test.safetensors"), framework="pt") as f:
        mean, lo, hi = (f.get_tensor(f"long.{k}") for k in ("mean", "lower", "upper"))
        target, available = f.get_tensor("long.target").bool(), f.get_tensor("long.available").bool()
    assert mean.shape == (6, 2, 64, 4, 4) and (lo <= mean + 1e-3).all() and (mean <= hi + 1e-3).all()
    assert not (target.any(1) & available).any()
    assert target[:, :, 32:].all() and not target[:, :, :32].any()


def test_per_user_tensors_train_evaluate_with_app_ranking(user_tensors, tmp_path):
    users = ["--short_horizon", "4", "--long_horizon", "96", "--patch_size", "8", "1", "2", "--max_entities", "5"]
    run("train", tmp_path, "--steps", "2", *users, config="complete_users.yaml", data_path=user_tensors)
    report = run("evaluate", tmp_path, *users, "--split", "val", "--figures", "false",
                 config="complete_users.yaml", data_path=user_tensors)
    ranking = report["long"]["recommendation"]
    assert set(ranking) >= {"recall@1", "ndcg@3", "mrr@5"} and 0 <= ranking["recall@5"] <= 1
    run("predict", tmp_path, *users, "--split", "val", config="complete_users.yaml", data_path=user_tensors)
    with safe_open(str(tmp_path / f"predictions_{user_tensors.name}_val.safetensors"), framework="pt") as f:
        order = f.get_tensor("short.app_ranking")
        assert f.get_tensor("user_id").shape == (5,)
    assert order.shape == (5, 20) and torch.equal(order.sort(1).values, torch.arange(20).expand(5, 20))


def test_a_fixed_mask_checkpoint_evaluates_with_its_own_mask(nj_path, tmp_path):
    run("train", tmp_path / "fixed", "--steps", "1", "--mask", "random", "--calibrate", "false", data_path=nj_path)
    run("evaluate", tmp_path / "fixed", "--figures", "false", data_path=nj_path)
    saved = json.loads((tmp_path / "fixed" / "eval_nj_traffic_users_64_test.json").read_text())
    assert saved["evidence"] == "available"  # not an untrained U-MASK
    run("train", tmp_path / "umask", "--steps", "1", "--calibrate", "false", data_path=nj_path)
    run("evaluate", tmp_path / "umask", "--figures", "false", data_path=nj_path)
    assert json.loads((tmp_path / "umask" / "eval_nj_traffic_users_64_test.json").read_text())["evidence"] == "umask"


def test_one_checkpoint_on_another_city_file_keeps_both_results(nj_path, tmp_path):
    from completion.city import resample_city

    run("train", tmp_path, "--steps", "1", data_path=nj_path)  # trains, then calibrates on NJ's val
    calibration = json.loads((tmp_path / "calibration_nj_traffic_users_64.json").read_text())
    assert calibration["spread"] != [[1.0, 1.0]] * 3 and all(0 <= a <= 1 for a in calibration["residual_weight"])
    hourly = resample_city(nj_path, tmp_path / "hourly.npz", steps_per_slot=4, drop_poi=(0,))
    run("evaluate", tmp_path, "--figures", "false", data_path=nj_path)
    with pytest.raises(ValueError, match="20 POI categories, the model expects 21"):
        run("evaluate", tmp_path, "--figures", "false", "--short_horizon", "1", "--long_horizon", "8",
            data_path=hourly)
    hourly_args = ("--figures", "false", "--short_horizon", "1", "--long_horizon", "8", "--pad_poi", "true")
    run("calibrate", tmp_path, *hourly_args, data_path=hourly)  # adapts the residual weight and spread, no training
    run("evaluate", tmp_path, *hourly_args, data_path=hourly)
    assert (tmp_path / "eval_nj_traffic_users_64_test.json").exists() and (tmp_path / "eval_hourly_test.json").exists()
    assert (tmp_path / "calibration_hourly.json").exists()
    assert json.loads((tmp_path / "calibration_nj_traffic_users_64.json").read_text()) == calibration  # untouched


def test_compare_runs_on_a_city_file_and_names_the_winner(nj_path, tmp_path):
    from recipes import compare

    run("train", tmp_path / "run", "--steps", "2", "--calibrate", "false", data_path=nj_path)
    cfg, comparison = compare.parse(
        ["--config", str(Path(complete.__file__).parent / "configs" / "complete_nj.yaml"), *TINY,
         "--data_path", str(nj_path), "--engine_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "cmp"),
         "--compare_entities", "6", "--patch_transformer_steps", "2", "--eval_tasks", "short", "long", "cold"])
    report = compare.main(cfg, comparison)
    assert report["cold_split"] == "test"  # a city file has no cold users: the scored split
    assert set(report["tasks"]) == {"short", "long", "cold"}
    assert "ARIMA(1,0,0) + daily Fourier" in report["tasks"]["short"]  # ARIMA is scored on the short task
    assert "ARIMA(1,0,0) + daily Fourier (cold)" in report["skipped"]  # and says why it is not on cold start
    assert report["headline"].startswith("short: best is ")
    assert (tmp_path / "cmp" / "comparison.md").read_text().splitlines()[2] == report["headline"]
    cfg.args.eval_tasks = ["short"]
    assert set(compare.main(cfg, comparison)["tasks"]) == {"short"}  # eval_tasks decides, cold is not forced
    assert report["calibration"] is None   # trained without calibration: nothing to apply


def test_compare_scores_the_calibrated_engine(nj_path, tmp_path):
    """compare applies calibration_<data>.json as evaluate does: another residual weight moves the engine's
    error, and the file compare read is named in comparison.json."""
    from recipes import compare

    run("train", tmp_path / "run", "--steps", "2", "--calibrate", "false", data_path=nj_path)
    argv = ["--config", str(Path(complete.__file__).parent / "configs" / "complete_nj.yaml"), *TINY,
            "--data_path", str(nj_path), "--engine_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "cmp"),
            "--compare_entities", "6", "--patch_transformer_steps", "2", "--eval_tasks", "short", "--arima", "false"]
    raw = compare.main(*compare.parse(argv))["tasks"]["short"][compare.ENGINE]["rmse_norm"]
    model = load_model(tmp_path / "run" / CHECKPOINT)
    calibration = {**model.calibration(), "residual_weight": (model.residual_weight * 0).tolist()}
    path = complete.calibration_path(tmp_path / "run", compare.parse(argv)[0].args.data_name)
    path.write_text(json.dumps(calibration))
    report = compare.main(*compare.parse(argv))
    assert report["calibration"] == str(path)
    assert report["tasks"]["short"][compare.ENGINE]["rmse_norm"] != pytest.approx(raw, rel=1e-6)

