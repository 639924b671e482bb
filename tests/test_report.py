"""The run report (scope/run/report.py): rendered from small fixture results, then in headless Chromium."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from scope.pituning.evaluate import precision_recall, user_class_counts  # noqa: E402
from scope.run.report import build_report, fmt, verdict  # noqa: E402

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


def class_counts(accuracy, seed):
    """Per-user intent counts (scope.pituning.evaluate.user_class_counts) of a predictor right ``accuracy`` of the time."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(240) % 5
    users = torch.arange(240) // 30
    right = torch.rand(240, generator=g) < accuracy
    scores = torch.nn.functional.one_hot(torch.where(right, labels, (labels + 1) % 5), 5).float()
    return user_class_counts(scores, labels, users, 5), precision_recall(labels, scores.argmax(1))["prec_m"]


ENGINE = "engine (U-MASK + DiT over the prior)"


@pytest.fixture
def run(tmp_path):
    """A run folder as recipes/demo.py leaves it: every capability has its results; embed was never run; the
    evaluate stage decoded constrained after DPO only (as the demo does); the engine is worse than
    persistence on cold start (a floor violation)."""
    root = tmp_path / "run"
    stages = ["cohort", "summary", "sft", "dpo", "evaluate", "novelty", "synthesis", "embed", "completion", "compare",
              "pituning", "lightgbm"]
    folders = {"evaluate": "evaluation", "embed": "embeddings"}
    status = {s: "done" for s in stages} | {"embed": "not run"}
    rows = [{"stage": s, "description": f"the {s} stage", "folder": str(root / folders.get(s, s)), "status": status[s],
             "detail": "", "wall_s": 12.5, "peak_rss_mb": 812.0, "commands": [f"python recipes/{s}.py"]} for s in stages]
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
    diff = lambda m, lo, hi: {"mean": m, "ci95": [lo, hi], "n": 20}
    metrics = lambda v: {"users_per_s": 0.25, "cut_off": 0, "schema_valid": ci(v), "field_agreement": ci(v / 2),
                         "grounding@3": ci(0.9 * v)}
    dump(root / "evaluation" / "evaluation.json", {
        "decodings": ["unconstrained", "constrained"], "teacher": "grounded-v2",
        "stages": {stage: {"users": 2, "user_ids": [1, 2], "unconstrained": metrics(v),
                           **({"constrained": metrics(1.0)} if stage == "after DPO" else {})}
                   for stage, v in (("before SFT", 0.0), ("after SFT", 0.9), ("after DPO", 0.95))},
        "teacher_scores": {"schema_valid": ci(1.0), "grounding@3": ci(0.98)},
        "vs_teacher": {"stage": "after DPO", "decoding": "unconstrained", "schema_valid": diff(-0.05, -0.15, 0.0),
                       "grounding@3": diff(-0.125, -0.2, -0.05)},
        "dpo_effect": {"unconstrained": {"changed_share": 0.35, "grounding@3": ci(0.06), "field_agreement": ci(0.01)}}})
    hits = {f"{t}_hit@3": ci(0.5) for t in ("apps", "places", "intents")}
    dump(root / "novelty" / "novelty.json", {
        "users": 2, "cases": 4, "cuts": ["first_days", "removed"], "excluded": {"no_targets": 1},
        "decoding": "constrained", "dpo_effect": {"changed_share": 0.5, "mean_hit@3": ci(0.125)},
        "methods": {name: {"cases": 4, **hits, "mean_hit@3": ci(v)}
                    for name, v in (("popularity", 0.61), ("kNN (statistics)", 0.7), ("student after SFT", 0.65),
                                    ("student after DPO", 0.7321))},
        "vs_baselines": {"student": "student after DPO", "mean_hit@3": {
            "popularity": diff(0.12, 0.05, 0.2), "kNN (statistics)": diff(0.032, -0.02, 0.08)}},
        "at_a_glance_note": {"novelty recommendation": "demo size: 2 users; benchmark (60 users): 0.942 vs kNN 0.967"}})
    dump(root / "dpo" / "metrics.json", {"pairs": 50, "train_reward_accuracy": 0.75, "train_reward_margin": 0.42,
                                         "student_schema_valid": 1.0})
    dump(root / "sft" / "metrics.json", {"train_users": 149, "train_loss": 1.23, "student_schema_valid": 1.0})
    dump(root / "synthesis" / "report" / "fidelity.json", {
        "pearson_r": 0.91, "r2": 0.83, "tstr_accuracy": 0.39, "trtr_accuracy": 0.4, "majority_accuracy": 0.17,
        "well_formed_rate": 1.0, "ceiling": {"pearson_r": 0.95}, "vs_ceiling_pearson_r": diff(-0.04, -0.09, 0.01)})
    png(root / "synthesis" / "report" / "corr_scatter.png", 3)
    compare = {task: {"persistence": {"rmse_norm": 1.0, "mae_norm": 0.5}, "historical average": {"rmse_norm": 1.1},
                      ENGINE: {"rmse_norm": 0.9871 if task != "cold" else 1.2, "mae_norm": 0.4, "recall@3": 0.6}}
               for task in ("short", "long", "cold")}
    dump(root / "compare" / "comparison.json", {"headline": "short: best is U-MASK + DiT (0.9871)", "tasks": compare,
                                                "engine_minus_baseline": {task: {
                                                    "persistence": diff(rows[ENGINE]["rmse_norm"] - 1.0, -0.03, -0.003)
                                                    if task != "cold" else diff(0.2, 0.1, 0.3),
                                                    "historical average": diff(-0.1, -0.2, 0.0)}
                                                    for task, rows in compare.items()}})
    dump(root / "completion" / "eval_tensors_test.json", {"tasks": {}})
    png(root / "completion" / "figures" / "masks_tensors_test.png", 1)
    png(root / "completion" / "figures" / "fpat_tensors_test.png", 2)
    tuned, tuned_prec = class_counts(0.9, 0)
    pooled, pooled_prec = class_counts(0.6, 1)
    frequent, frequent_prec = class_counts(0.3, 2)
    metrics = {"prec_w": 0.2253, "rec_w": 0.24, "prec_m": tuned_prec, "rec_m": 0.19, "ndcg3": 0.41, "ndcg5": 0.48}
    dump(root / "pituning" / "report.json", {"metrics": {"PITuning": metrics}, "student_params": 700050,
                                             "class_counts": {"PITuning": tuned}})
    dump(root / "lightgbm" / "lightgbm.json", {
        "metrics": {"LightGBM per user": {**metrics, "prec_m": 0.147},
                    "LightGBM pooled (population + individual)": {**metrics, "prec_m": pooled_prec},
                    "most frequent intent per (user, slot)": {**metrics, "prec_m": frequent_prec}},
        "class_counts": {"LightGBM pooled (population + individual)": pooled,
                         "most frequent intent per (user, slot)": frequent}})
    return root


CAPABILITIES = ("profiles: schema_valid", "profiles: grounding@3", "DPO", "novelty recommendation", "synthesis",
                "completion: short", "completion: long", "completion: cold", "PITuning")


def glance_rows(page: str) -> dict[str, str]:
    """capability -> verdict, read from the at-a-glance table of the page."""
    table = page.split('<table class="glance">')[1].split("</table>")[0]
    rows = re.findall(r'<td class="first">(.*?)</td>.*?<td class="verdict [^"]*">(.*?)</td>', table, re.S)
    return dict(rows)


def test_the_report_opens_with_the_answer(run):
    page = build_report(run, run / "report").read_text()
    sections = re.findall(r'<section id="([^"]+)">', page)
    assert sections[0] == "at-a-glance" and sections[-1] == "run"   # the answer first, provenance last
    assert "Results at a glance" in page.split('<section id="cohort">')[0]
    verdicts = glance_rows(page)
    assert verdicts == {"profiles: schema_valid": "tie", "profiles: grounding@3": "worse", "DPO": "better",
                        "novelty recommendation": "tie", "synthesis": "tie", "completion: short": "better",
                        "completion: long": "better", "completion: cold": "worse", "PITuning": "better"}
    glance = page.split('<section id="at-a-glance">')[1].split("</section>")[0]
    for text in ("teacher (grounded-v2)", "kNN (statistics)", "LightGBM pooled (population + individual)",
                 "ceiling: the real traces serialised and written back", "+0.032 [-0.020, +0.080]",
                 "demo size: 2 users; benchmark (60 users): 0.942 vs kNN 0.967", "lower is better"):
        assert text in glance, text
    # the engine's RMSE is compared with the best simple baseline of each task: persistence here
    assert glance.count(f"<td class=\"text\">{ENGINE}</td>") == 3 and "historical average" not in glance


def test_verdict_reads_the_ci_in_the_good_direction():
    assert verdict([0.01, 0.2]) == "better" and verdict([-0.2, -0.01]) == "worse" and verdict([-0.1, 0.1]) == "tie"
    assert verdict([-0.2, -0.01], higher_is_better=False) == "better"   # an error (RMSE) that went down
    assert verdict([0.0, 0.3]) == "tie" and verdict([float("nan"), 0.1]) == "no CI"


def test_a_floor_violation_is_red_at_the_top(run):
    page = build_report(run, run / "report").read_text()
    top = page.split('<table class="glance">')[0]
    assert '<div class="violations">' in top and "Something is wrong" in top
    assert "compare: the engine&#39;s rmse_norm (cold, vs persistence) = 1.2, at or above its floor 1" in top
    assert top.count("<li>") == 1   # only the task beyond its floor


def test_the_pituning_difference_is_a_bootstrap_over_users(run):
    from scope.pituning.evaluate import macro_precision_difference

    report = json.loads((run / "pituning" / "report.json").read_text())
    lgb = json.loads((run / "lightgbm" / "lightgbm.json").read_text())
    d = macro_precision_difference(report["class_counts"]["PITuning"],
                                   lgb["class_counts"]["LightGBM pooled (population + individual)"])
    tuned, pooled = report["metrics"]["PITuning"]["prec_m"], lgb["metrics"]["LightGBM pooled (population + individual)"]["prec_m"]
    assert d["mean"] == pytest.approx(tuned - pooled) and d["ci95"][0] < d["mean"] < d["ci95"][1] and d["users"] == 8


def test_a_stage_without_results_is_a_plain_not_run_row(run):
    rows = json.loads((run / "pipeline.json").read_text())
    for row in rows["stages"]:
        if row["stage"] == "synthesis":
            row.update(status="failed", detail="exit 1 of `python recipes/synthesize.py train`")
    dump(run / "pipeline.json", rows)
    shutil.rmtree(run / "synthesis")
    (run / "lightgbm" / "lightgbm.json").unlink()
    page = build_report(run, run / "report").read_text()
    verdicts = glance_rows(page)
    assert set(verdicts) == set(CAPABILITIES)
    assert verdicts["synthesis"] == "not run" and verdicts["PITuning"] == "not run"
    glance = page.split('<section id="at-a-glance">')[1].split("</section>")[0]
    assert "not run: stage &#39;synthesis&#39; failed (exit 1 of `python recipes/synthesize.py train`)" in glance
    assert "not run: lightgbm.json not found" in glance
    # the synthesis section says why too, as a labelled box
    assert "stage &#39;synthesis&#39; failed (exit 1 of `python recipes/synthesize.py train`)" in \
        page.split('<section id="synthesis">')[1].split("</section>")[0]


def test_a_missing_constrained_decoding_is_said_not_crashed_on(run):
    page = build_report(run, run / "report").read_text()
    student = page.split('<section id="student">')[1].split("</section>")[0]
    assert "KeyError" not in student and "Not available" not in student
    assert "Not run: the constrained decoding of before SFT, after SFT" in student
    assert "Teacher: grounded-v2." in student


def test_the_timings_come_from_timings_json_when_the_runner_wrote_it(run):
    dump(run / "timings.json", {"stages": [{"stage": "sft", "status": "done", "wall_s": 407.25, "cpu_s": 790.5,
                                            "peak_rss_mb": 4321.0}],
                                "total_wall_s": 1190.0, "started_at": "2026-12-01T10:00:00+00:00",
                                "finished_at": "2026-12-01T10:19:50+00:00"})
    provenance = build_report(run, run / "report").read_text().split('<section id="run">')[1]
    assert "407.2" in provenance and "790.5" in provenance and "4,321" in provenance
    assert "The whole job took 19.83 min of wall time" in provenance


def test_report_shows_every_result_and_says_why_one_is_missing(run, tmp_path):
    path = build_report(run, run / "report", title="fixture run")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "fixture run" in page
    for text in ("Provenance", "after DPO", "0.9871", "constrained decoding", "35% of the held-out answers changed",
                 "kNN (statistics)", "0.732 [0.37, 1.00]", "+0.125 [+0.06, +0.19]", "In short: short: best is U-MASK + DiT",
                 "LightGBM per user", "0.147", "0.75", "Short-term prediction", "Cold-start", "880,703", "abc123",
                 "User clusters", "Masks per task", "Pearson r of Corr(app, POI)"):
        assert text in page, text
    # the stage that never ran is a labelled box with its reason, not a crash; the only other box is the
    # fixture's missing training logs
    assert "stage &#39;embed&#39; has not run yet" in page
    boxes = re.findall(r'<div class="missing"><b>Not available</b>: (.*?)</div>', page)
    assert boxes and all("embed" in b or "training logs" in b for b in boxes), boxes
    # self-contained: figures embedded, nothing fetched from elsewhere
    assert page.count("data:image/png;base64,") >= 6
    assert "src=\"http" not in page and "href=\"http" not in page
    summary = json.loads((run / "report" / "report.json").read_text())
    assert summary["statuses"]["embed"] == "not run"
    assert summary["sections"]["at-a-glance"][0]["kind"] == "violations"


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
    # the first screen holds the answer: the red floor-violation box and the green "better" verdicts
    first = image[:1000, :, :3]
    red = (first[..., 0] > 0.55) & (first[..., 1] < 0.3) & (first[..., 2] < 0.3)
    green = (np.abs(first - np.array([198, 246, 213]) / 255).max(-1) < 0.03)
    assert red.sum() > 500 and green.sum() > 500, (red.sum(), green.sum())


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


def test_glance_notes_give_each_benchmarks_figure_beside_the_demos(tmp_path):
    import json

    from scope.run.report import BENCHMARK_RESULTS, benchmark_notes

    (tmp_path / "completion_users.json").write_text(json.dumps(
        {"engine_vs_best_baseline_short": -0.0122, "best_baseline_short": "hu_knn",
         "engine_vs_best_baseline_cold": 0.0423, "best_baseline_cold": "masked_patch_transformer"}))
    notes = benchmark_notes(tmp_path)
    assert "-1.2% RMSE gain over its best baseline (hu_knn)" in notes["completion: short"]
    assert "+4.2%" in notes["completion: cold"] and "fewest events" in notes["completion: cold"]
    assert "completion: long" not in notes and "PITuning" not in notes                 # no figure, no claim
    assert "fewest events" not in benchmark_notes(tmp_path, cold_split="test").get("completion: cold", "")
    shipped = benchmark_notes(BENCHMARK_RESULTS)                                        # the repository's results
    assert {"DPO", "novelty recommendation", "PITuning", "completion: cold"} <= set(shipped)
    assert "cases)" in shipped["DPO"] and "LightGBM pooled" in shipped["PITuning"]
