"""What ``model_name_or_path`` accepts (scope.profiles.llms.resolve_model): the registry names, a local
model folder, or a Hub id such as the original SmolLM2 weights or the 8B recipes' Llama-3.1."""

from pathlib import Path

import pytest
import yaml

from scope.profiles.llms import ModelNotFoundError, resolve_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct"])
def test_a_hub_id_is_passed_to_transformers(hub_id):
    assert resolve_model(hub_id) == hub_id   # resolved from the Hub cache by from_pretrained (nothing loaded here)


def test_every_8b_recipe_names_a_hub_id_that_resolves():
    paths = sorted((ROOT / "recipes" / "configs").glob("*llama31_8b*.yaml"))
    assert paths
    for path in paths:
        name = yaml.safe_load(path.read_text())["model_name_or_path"]
        assert resolve_model(name) == name == "meta-llama/Llama-3.1-8B-Instruct", path.name


def test_a_local_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("name", ["./no-such-folder", "org/name/extra", "no-slash", "C:\\models\\x"])
def test_not_a_folder_nor_a_hub_id(name):
    with pytest.raises(ModelNotFoundError):
        resolve_model(name)
