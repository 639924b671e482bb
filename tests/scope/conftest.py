"""U-SCOPE fixtures: the SmolLM2 tokenizer (from the converted cache), a tiny random Llama built
from a config (real TRL / PEFT steps in seconds), a profiled corpus of the small simulated cohort."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scope.profiles.corpus import ProfileDataArguments, build_corpus
from scope.profiles.llms import load_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, 32-wide random Llama with the SmolLM2 tokenizer, saved as a model folder."""
    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def data_args(cohort_dir: Path, cache_dir: Path, **overrides) -> ProfileDataArguments:
    return ProfileDataArguments(cohort_dir=str(cohort_dir), simulate_if_missing=False,
                                teacher_cache_dir=str(cache_dir), **overrides)


@pytest.fixture(scope="session")
def corpus(small_cohort, tmp_path_factory):
    return build_corpus(data_args(small_cohort, tmp_path_factory.mktemp("teacher-cache")))
