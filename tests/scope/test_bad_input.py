"""Bad input: unknown config key (named), missing model, empty cohort, a user with no events,
a missing cohort; plus the registry's GGUF conversion leaving no quantized state behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scope.data.events import DataError
from scope.data.statistics import cohort_statistics
from scope.data.tsinghua import TRACE_FILE, load_cohort
from scope.profiles.corpus import ProfileDataArguments, build_corpus, ensure_cohort
from scope.profiles.llms import ModelNotFoundError, load_causal_lm, resolve_model
from scope.profiles.prompts import PromptBuilder
from scope.profiles.teachers import GroundedTeacher
from tests.scope.conftest import data_args

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_config_key_is_named_by_the_recipe(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "recipes/configs/sft_cpu.yaml").read_text()), "lora_rr": 8}))
    done = subprocess.run([sys.executable, "recipes/sft.py", "--config", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "lora_rr" in done.stderr


@pytest.mark.parametrize("name, message", [
    ("/nonexistent/model", "not an existing folder"),
    ("no-such-registry-name", "not a registry name"),
])
def test_missing_model_is_a_clear_error(name, message):
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(name)


def test_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_converted_smollm2_has_no_quantized_state():
    folder = Path(resolve_model("smollm2-135m-instruct"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and (folder / "model.safetensors").exists()


def test_empty_cohort_is_an_error(small_cohort, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for f in small_cohort.iterdir():
        if f.is_file():
            (empty / f.name).write_bytes(b"" if f.name == TRACE_FILE else f.read_bytes())
    with pytest.raises(DataError, match="file is empty"):
        build_corpus(data_args(empty, tmp_path / "cache"))
    cohort = load_cohort(small_cohort)
    cohort.events = cohort.events.iloc[:0]
    with pytest.raises(ValueError, match="has no events"):
        build_corpus(data_args(small_cohort, tmp_path / "cache"), cohort=cohort)


def test_missing_cohort_without_simulation_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cohort_dir must hold a Tsinghua-format cohort"):
        ensure_cohort(ProfileDataArguments(cohort_dir=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()  # a given path is never simulated into


def test_user_with_no_events_gets_a_prompt_and_a_valid_profile(corpus):
    stats = cohort_statistics(corpus.cohort.events, corpus.cohort.categories, corpus.clusters, user_ids=[999_999])
    prompt = PromptBuilder()(stats[999_999])
    assert "no app-usage records" in prompt.user and "999999" not in prompt.text
    (result,) = GroundedTeacher().generate([prompt])
    assert result.ok and result.profile.temporal_regularities.most_active_period == "unknown"
