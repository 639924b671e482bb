"""DPO (Eq. 27): preference triplets of each kind (on-policy recommendation pairs included), and one
real DPOTrainer step on top of an SFT adapter with the adapter-disabled model as reference."""

import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import DPOConfig, ModelConfig

from recipes import dpo as dpo_recipe
from scope.profiles.dpo import popularity_profile, preference_dataset
from tests.scope.conftest import data_args


def test_triplets_prefer_the_grounded_profile(corpus):
    ds = preference_dataset(corpus, kinds=("popularity", "other_user"))
    users = {u for u in corpus.profiled("train") if not corpus.stats[u].empty}
    assert set(ds["user_id"]) == users and set(ds["kind"]) == {"popularity", "other_user"}
    for row in ds:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == corpus.results[row["user_id"]].profile.to_json() and rejected != chosen
    popular = popularity_profile(corpus)
    assert popular.top_categories() == corpus.population.top_apps(3)
    other = [r for r in ds if r["kind"] == "other_user"]
    assert all(r["rejected"][0]["content"] != popularity_profile(corpus).to_json() for r in other)


def test_failing_student_samples_become_negatives(corpus):
    u, v = corpus.profiled("train")[:2]
    answers = {u: "I am not sure about this user.", v: corpus.results[v].profile.to_json()}  # invalid vs perfect
    ds = preference_dataset(corpus, kinds=("student",), student_answers=answers)
    assert ds["user_id"] == [u] and ds["kind"] == ["student"]
    with pytest.raises(ValueError, match="unknown negative kinds"):
        preference_dataset(corpus, kinds=("nonsense",))


def test_one_real_dpo_step_on_the_sft_adapter(small_cohort, tiny_model_dir, tmp_path):
    sft = tmp_path / "sft"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(sft)
    script = dpo_recipe.DPOScriptArguments(**vars(data_args(small_cohort, tmp_path / "cache", recommend_max_new_tokens=8)),
                                           sft_adapter=str(sft), eval_pairs=2, eval_users=1, eval_max_new_tokens=8,
                                           threads=1, negatives=["popularity", "other_user", "student_recommendation"],
                                           student_negative_cases=2, student_samples=2)
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                         max_steps=1, per_device_train_batch_size=1, per_device_eval_batch_size=1, beta=0.2,
                         max_length=1024, logging_steps=1, save_steps=1, report_to="none", seed=0)
    model = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                        lora_target_modules=["q_proj", "v_proj"], lora_task_type="CAUSAL_LM")
    metrics = dpo_recipe.main(script, training, model)
    assert metrics["beta"] == 0.2 and metrics["pairs"] > 0
    # 2 samples of 8 random tokens per case: both invalid, a tie, so the teacher's answer is y_w
    assert metrics["pairs_by_kind"]["student_recommendation"] == 2 and "student_ranked" not in metrics["pairs_by_kind"]
    assert metrics["train_reward_accuracy"] is not None and metrics["train_reward_margin"] is not None
    assert metrics["heldout_reward_accuracy"] is not None and "student_grounding@3" in metrics
    assert (tmp_path / "dpo" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "dpo" / "metrics.json").read_text())["pairs"] == metrics["pairs"]
