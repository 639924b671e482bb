"""The run report (scope/run/report.py): rendered from small fixture results, then in headless Chromium."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from scope.run.report import build_report, fmt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(np.random.default_rng(seed).normal(size=50).cumsum())
    fig.savefig(path)
    plt.close(fig)


def dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def run(tmp_path):
    """A run folder as recipes/demo.py leaves it; synthesis failed, embed was never run."""
    root = tmp_path / "run"
    stages = ["cohort", "summary", "sft", "dpo", "evaluate", "novelty", "synthesis", "embed", "completion", "compare",
              "pituning", "lightgbm"]
    folders = {"evaluate": "evaluation", "embed": "embeddings"}
    status = {s: "done" for s in stages} | {"synthesis": "failed", "embed": "not run"}
    rows = [{"stage": s, "description": f"the {s} stage", "folder": str(root / folders.get(s, s)), "status": status[s],
             "detail": "exit 1 of `python recipes/synthesize.py train`" if s == "synthesis" else "",
             "wall_s": 12.5, "peak_rss_mb": 812.0, "commands": [f"python recipes/{s}.py"]} for s in stages]
    dump(root / "pipeline.json", {"stages": rows})
    for s in stages:
        if status[s] == "done":
            dump(root / folders.get(s, s) / "stage.json", {
                "stage": s, "status": "ok", "configs": {}, "commands": [f"python recipes/{s}.py --seed 0"],
                "versions": {"torch": "2.13.0", "trl": "1.16.0"}, "git_commit": "abc123", "python": "3.11",
                "wall_s": 12.5, "peak_rss_mb": 812.0, "finished_at": "2026-11-23T00:00:00+00:00"})
    dump(root / "summary" / "summary.json", {"users": 200, "events": 880703, "days": 7, "windows": 763,
                                              "groups": {"commuter": 57, "student": 43}, "split_users": {"train": 149}})
    for name in ("activity_by_group", "apps_by_group", "example_tensor"):
        png(root / "summary" / f"{name}.png")
    ci = lambda m: {"mean": m, "ci95": [m / 2, min(1.0, m * 1.5)]}
    metrics = lambda v: {"users_per_s": 0.25, "cut_off": 0, "schema_valid": ci(v), "field_agreement": ci(v / 2),
                         "grounding@3": ci(v / 2)}
    dump(root / "evaluation" / "evaluation.json", {
        "decodings": ["unconstrained", "constrained"], "teacher": "grounded-v2",
        "stages": {stage: {"users": 2, "user_ids": [1, 2], "unconstrained": metrics(v), "constrained": metrics(1.0)}
                   for stage, v in (("before SFT", 0.0), ("after SFT", 0.5), ("after DPO", 1.0))},
        "dpo_effect": {"unconstrained": {"changed_share": 0.35, "grounding@3": ci(0.06), "field_agreement": ci(0.01)}}})
    hits = {f"{t}_hit@3": ci(0.5) for t in ("apps", "places", "intents")}
    dump(root / "novelty" / "novelty.json", {
        "users": 2, "cases": 4, "cuts": ["first_days", "removed"], "excluded": {"no_targets": 1},
        "decoding": "constrained", "dpo_effect": {"changed_share": 0.5, "mean_hit@3": ci(0.125)},
        "methods": {name: {"cases": 4, **hits, "mean_hit@3": ci(v)}
                    for name, v in (("popularity", 0.61), ("kNN (statistics)", 0.7), ("student after DPO", 0.7321))}})
    dump(root / "dpo" / "metrics.json", {"pairs": 50, "train_reward_accuracy": 0.75, "train_reward_margin": 0.42})
    dump(root / "sft" / "metrics.json", {"train_users": 149, "train_loss": 1.23})
    dump(root / "compare" / "comparison.json", {"headline": "short: best is U-MASK + DiT (0.9871)", "tasks": {
        task: {"historical average": {"rmse_norm": 1.1, "mae_norm": 0.5},
               "U-MASK + DiT": {"rmse_norm": 0.9871, "mae_norm": 0.4, "recall@3": 0.6}}
        for task in ("short", "long", "cold")}})
    dump(root / "completion" / "eval_tensors_test.json", {"tasks": {}})
    png(root / "completion" / "figures" / "masks_tensors_test.png", 1)
    png(root / "completion" / "figures" / "fpat_tensors_test.png", 2)
    metrics = {"prec_w": 0.2253, "rec_w": 0.24, "prec_m": 0.18, "rec_m": 0.19, "ndcg3": 0.41, "ndcg5": 0.48}
    dump(root / "pituning" / "report.json", {"metrics": {"PITuning": metrics}, "student_params": 700050})
    dump(root / "lightgbm" / "lightgbm.json", {"metrics": {"LightGBM per user": {**metrics, "prec_m": 0.147}}})
    return root


def test_report_shows_every_result_and_says_why_one_is_missing(run, tmp_path):
    path = build_report(run, run / "report", title="fixture run")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "fixture run" in page
    for text in ("What was run", "after DPO", "0.9871", "constrained decoding", "35% of the held-out answers changed",
                 "kNN (statistics)", "0.732 [0.37, 1.00]", "+0.125 [+0.06, +0.19]", "In short: short: best is U-MASK + DiT", "LightGBM per user",
                 "0.147", "0.75", "Short-term prediction", "Cold-start", "880,703", "abc123", "User clusters", "Masks per task"):
        assert text in page, text
    # the failed stage and the stage that never ran are labelled boxes with their reason, not a crash
    assert "stage &#39;synthesis&#39; failed (exit 1 of `python recipes/synthesize.py train`)" in page
    assert "stage &#39;embed&#39; has not run yet" in page
    assert page.count('class="missing"') >= 2
    # self-contained: figures embedded, nothing fetched from elsewhere
    assert page.count("data:image/png;base64,") >= 5
    assert "src=\"http" not in page and "href=\"http" not in page
    summary = json.loads((run / "report" / "report.json").read_text())
    assert summary["statuses"]["synthesis"] == "failed"


def test_report_of_an_empty_run_is_all_missing_boxes(tmp_path):
    page = build_report(tmp_path / "nothing", tmp_path / "report").read_text()
    assert "Not available" in page and "<table>" not in page.split("The cohort")[1]


def test_cell_formatting():
    assert fmt(None) == "–" and fmt(float("nan")) == "–"
    assert fmt(0.123456) == "0.1235" and fmt(1234567) == "1,234,567" and fmt(True) == "yes"
    assert fmt({"a": 1.0}) == "a: 1"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(run, tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs it: apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI fails instead of skipping")
    page = build_report(run, run / "report")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1280,4000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.exists()
    image = plt.imread(shot)
    assert image.shape[:2] == (4000, 1280)
    gray = image[..., :3].mean(-1)
    assert gray.std() > 0.05, "the screenshot is blank"
    # the header band (dark) and the page (light) are both there: the page was styled and laid out
    assert gray[:60].mean() < 0.5 < gray[1000:3000].mean()


def test_report_embeds_only_configs_inside_the_repository_or_the_run(run, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("password: hunter2-outside\n")
    (run / "sft" / "sft.yaml").write_text("learning_rate: 7.7e-5  # inside the run\n")
    (run / "sft" / "link.yaml").symlink_to(secret)   # inside by name, outside once resolved
    record = json.loads((run / "sft" / "stage.json").read_text())
    record["configs"] = {p: "sha" for p in ("/etc/hostname", str(secret), str(run / "sft" / "sft.yaml"),
                                            str(run / "sft" / "link.yaml"),
                                            str(ROOT / "recipes" / "configs" / "sft_cpu.yaml"))}
    dump(run / "sft" / "stage.json", record)
    page = build_report(run, run / "report").read_text()
    assert "learning_rate: 7.7e-5" in page and "sft: sft_cpu.yaml" in page
    assert "hunter2-outside" not in page and "sft: hostname" not in page
    for path in ("/etc/hostname", str(secret), str(run / "sft" / "link.yaml")):
        assert f"configuration {path} was not embedded: it is outside both the repository and the run folder" in page
