"""U-SCOPE fixtures: the SmolLM2 tokenizer (from the converted cache), a tiny random Llama built
from a config (real TRL / PEFT steps in seconds), a profiled corpus of the small simulated cohort."""

from pathlib import Path

import pytest
import torch

from scope.profiles.corpus import ProfileDataArguments, build_corpus
from scope.profiles.llms import load_tokenizer, save_random_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, 32-wide random Llama with the SmolLM2 tokenizer, saved as a model folder."""
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def data_args(cohort_dir: Path, cache_dir: Path, **overrides) -> ProfileDataArguments:
    return ProfileDataArguments(cohort_dir=str(cohort_dir),
                                teacher_cache_dir=str(cache_dir), **overrides)


@pytest.fixture(scope="session")
def corpus(small_cohort, tmp_path_factory):
    return build_corpus(data_args(small_cohort, tmp_path_factory.mktemp("teacher-cache")))
