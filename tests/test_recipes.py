"""The recipes' real entry points (as a user runs them) and their YAML configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from completion.tensors import TensorConfig
from recipes import cohort, demo, tensorize
from scope.cli import parse_config
from scope.data.splits import UserSplitter

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cohort.yaml": (cohort.CohortArguments,),
           "tensorize.yaml": (tensorize.TensorizeArguments, TensorConfig, UserSplitter),
           "demo.yaml": (demo.DemoArguments,)}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_data_config_parses_into_its_dataclass(name):
    args, *_ = parse_config(CONFIGS[name], ["--config", str(ROOT / "recipes" / "configs" / name)])
    assert args is not None


def test_cohort_then_tensorize_from_the_command_line(tmp_path):
    done = run("cohort.py", "--config", "recipes/configs/cohort.yaml", "--output_dir", str(tmp_path / "c"),
               "--n_users", "12", "--days", "2", "--n_stations", "300")
    assert done.returncode == 0, done.stderr
    assert "events of 12 users" in done.stdout
    done = run("tensorize.py", "--config", "recipes/configs/tensorize.yaml", "--cohort_dir", str(tmp_path / "c"),
               "--output_dir", str(tmp_path / "t"), "--height", "2", "--width", "3")
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "t" / "dataset.json").read_text())
    assert meta["shape"] == {"C": 22, "T": 192, "H": 2, "W": 3}
    assert meta["totals"]["users"] == 12
    assert json.loads((tmp_path / "t" / "load_report.json").read_text())["rows_kept"] == meta["totals"]["events"]


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"n_users": 3, "n_userz": 4}))
    done = run("cohort.py", "--config", str(config), "--output_dir", str(tmp_path / "c"))
    assert done.returncode != 0 and "n_userz" in done.stderr


def test_bad_trace_stops_tensorize_with_its_location_and_lenient_reports(tmp_path):
    assert run("cohort.py", "--output_dir", str(tmp_path / "c"), "--n_users", "3", "--days", "1").returncode == 0
    trace = tmp_path / "c" / "App_usage_trace.txt"
    lines = trace.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " -7"
    trace.write_text("\n".join(lines) + "\n")
    done = run("tensorize.py", "--cohort_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "t"))
    assert done.returncode != 0
    assert "App_usage_trace.txt:5: field 'traffic_bytes'" in done.stderr
    assert not (tmp_path / "t" / "dataset.json").exists()
    done = run("tensorize.py", "--cohort_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "t"), "--lenient", "true")
    assert done.returncode == 0, done.stderr
    assert "negative_traffic: 1" in done.stdout
    report = json.loads((tmp_path / "t" / "load_report.json").read_text())
    assert report["rows_read"] == len(lines) and report["rows_kept"] == len(lines) - 1

