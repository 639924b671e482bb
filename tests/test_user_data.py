"""The main job on a cohort the simulator did not write: hand-built Tsinghua-format files with other
user ids, station ids, days and the real files' quirks. Every stage reads the folder in place
(nothing is written there, nothing is simulated), and a missing folder is an error."""

import hashlib
import json
from pathlib import Path

import numpy as np

from recipes import demo

CATEGORIES = ["Utilities", "Games", "Entertainment", "News", "Social\\_Networking", "Shopping", "Finance", "Business",
              "Travel", "Lifestyle ", "Education", "Health&Fitness ", "infant&mom", "Navigation", "Weath1er", "Music",
              "References ", "Books", "Photo&Video", "sports"]
POI = ["Medical care", "Hotel", "Business affairs", "Life service", "Transportation hub", "Culture", "Sports",
       "Residence", "Entertainment and leisure", "Scenic spot", "Government", "Factory", "Shopping", "Restaurant",
       "Education", "Landmark", "Other"]


def hand_built_cohort(root: Path, n_users: int = 14, seed: int = 5) -> Path:
    """Users 7000001.., stations 90000.., apps 5000.., three days of March 2017, a stray line and
    escaped names in Categorys.txt (no final newline), a few users too small to be more than cold."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    lines = [f"{i}\t'{name}'" for i, name in enumerate(CATEGORIES)]
    lines.insert(5, "'wechat','linkedin'")  # a stray line, as in the real file
    (root / "Categorys.txt").write_text("\n".join(lines))
    apps = {5000 + a: int(rng.integers(0, len(CATEGORIES))) for a in range(60)}
    (root / "App2Category.txt").write_text("".join(f"{a} {c}\n" for a, c in apps.items()))
    stations = [90000 + 17 * s for s in range(40)]
    poi = rng.poisson(3, size=(len(stations), len(POI)))
    (root / "base_poi.txt").write_text("BaseID\t" + "\t".join(POI) + "\n"
                                       + "".join(f"{b}\t" + "\t".join(map(str, row)) + "\n" for b, row in zip(stations, poi)))
    trace = []
    for u in range(n_users):
        user = 7000001 + 37 * u
        home, work = rng.choice(stations, 2, replace=False)
        favourite = rng.choice(list(apps), 6)
        n = int(rng.integers(20, 40)) if u % 5 == 0 else int(rng.integers(150, 400))
        seconds = np.sort(rng.integers(0, 3 * 86400, n))
        for t in seconds:
            day, rest = divmod(int(t), 86400)
            hour, rest = divmod(rest, 3600)
            station = work if 9 <= hour < 18 and rng.random() < 0.7 else home
            app = int(rng.choice(favourite)) if rng.random() < 0.8 else int(rng.choice(list(apps)))
            trace.append(f"{user} 201703{1 + day:02d}{hour:02d}{rest // 60:02d}{rest % 60:02d} {station} {app} "
                         f"{int(rng.lognormal(7, 1))}\n")
    (root / "App_usage_trace.txt").write_text("".join(trace))
    return root


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_main_job_runs_on_your_own_files_and_never_writes_there(tmp_path):
    cohort = hand_built_cohort(tmp_path / "my data")
    before = digest(cohort)
    run = tmp_path / "run"
    for stage in ("cohort", "tensors", "summary", "embed", "report"):
        args = demo.parse(["--config", "recipes/configs/demo.yaml", "--cohort_dir", str(cohort),
                           "--output_dir", str(run), "--only", stage, "--quiet", "true", "--threads", "1"])
        assert demo.main(args) == 0, (run / stage / "stage.log").read_text()[-3000:] if (run / stage).exists() else stage
    assert digest(cohort) == before  # read in place: nothing written, nothing simulated into the folder
    assert not (run / "cohort" / "App_usage_trace.txt").exists()
    recorded = json.loads((run / "cohort" / "cohort.json").read_text())
    assert recorded["source"] == str(cohort.resolve()) and recorded["categories"] == 20
    dataset = json.loads((run / "tensors" / "dataset.json").read_text())
    assert dataset["totals"]["users"] == 14 and "cold" in dataset["splits"]
    page = (run / "report" / "index.html").read_text()
    assert "Your cohort, read in place from" in page and "the persona their profile names" in page
    # labels the user supplies colour the clusters instead
    (cohort / "user_labels.csv").write_text("user_id,label\n" + "".join(
        f"{7000001 + 37 * u},{'group A' if u % 2 else 'group B'}\n" for u in range(14)))
    args = demo.parse(["--config", "recipes/configs/demo.yaml", "--cohort_dir", str(cohort), "--output_dir", str(run),
                       "--only", "report", "--quiet", "true"])
    assert demo.main(args) == 0
    assert "the labels of user_labels.csv" in (run / "report" / "index.html").read_text()


def test_a_missing_cohort_folder_is_an_error_not_a_simulation(tmp_path):
    args = demo.parse(["--config", "recipes/configs/demo.yaml", "--cohort_dir", str(tmp_path / "typo"),
                       "--output_dir", str(tmp_path / "run"), "--only", "cohort", "--quiet", "true"])
    assert demo.main(args) != 0
    assert "App_usage_trace.txt not found" in (tmp_path / "run" / "cohort" / "stage.log").read_text()
    assert not (tmp_path / "typo").exists()
