"""SFT: the chat dataset, assistant-only loss with a trained end-of-turn token, one real TRL + PEFT
step through the recipe, resume from the last checkpoint, and the saved artifacts."""

import json

import pytest
from trl import ModelConfig, SFTConfig, SFTTrainer

from recipes import sft as sft_recipe
from scope.profiles.sft import end_of_turn_token, last_checkpoint, score_labelled_positions_only, sft_dataset
from tests.scope.conftest import data_args


def sft_config(out, **overrides) -> SFTConfig:
    values = dict(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False, max_steps=1,
                  per_device_train_batch_size=1, learning_rate=1e-3, save_strategy="steps", save_steps=1,
                  logging_steps=1, report_to="tensorboard", max_length=1024, completion_only_loss=True,
                  dataloader_num_workers=0, seed=0)
    return SFTConfig(**{**values, **overrides})


def model_config(path) -> ModelConfig:
    return ModelConfig(model_name_or_path=str(path), dtype="float32", use_peft=True, lora_r=4, lora_alpha=8,
                       lora_target_modules=["q_proj", "v_proj"], lora_task_type="CAUSAL_LM")


def test_chat_dataset_is_prompt_completion(corpus):
    ds = sft_dataset(corpus)
    assert len(ds) == len(corpus.profiled("train")) and set(ds.column_names) == {"prompt", "completion", "user_id", "task"}
    assert set(ds["task"]) == {"profile"}
    row = ds[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["completion"][0]["role"] == "assistant"
    assert json.loads(row["completion"][0]["content"])["reasoning"]


def test_loss_is_on_the_assistant_turn_and_its_end_token(corpus, tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=sft_config(tmp_path),
                         train_dataset=sft_dataset(corpus).select(range(2)), processing_class=tokenizer)
    row = trainer.train_dataset[0]
    ids, mask = row["input_ids"], [int(label != -100) for label in row["labels"]]
    first = mask.index(1)
    prompt_text = tokenizer.decode(ids[:first])
    assert prompt_text.rstrip().endswith("assistant") and '{"reasoning"' not in prompt_text
    trained = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained).lstrip().startswith('{"reasoning"')
    end = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    assert end in trained[-3:]  # the end-of-turn token is learned, so generation stops


def test_one_real_step_then_resume(small_cohort, tiny_model_dir, tmp_path):
    script = sft_recipe.SFTScriptArguments(**vars(data_args(small_cohort, tmp_path / "cache")), eval_users=1,
                                           eval_max_new_tokens=8, threads=1)
    metrics = sft_recipe.main(script, sft_config(tmp_path / "run"), model_config(tiny_model_dir))
    out = tmp_path / "run"
    assert metrics["resumed_from"] == "none" and metrics["train_loss"] > 0
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").exists() and last_checkpoint(out).endswith("checkpoint-1")
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "## Metrics" in card and "lora_r: 4" in card
    assert "student_schema_valid" in json.loads((out / "metrics.json").read_text())
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard logs"

    metrics = sft_recipe.main(script, sft_config(out, max_steps=2), model_config(tiny_model_dir))
    assert metrics["resumed_from"] == "checkpoint-1"
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_no_training_users_is_an_error(corpus):
    with pytest.raises(ValueError, match="no profiled users"):
        sft_dataset(corpus, ["nonexistent-split"])


def test_recommendation_turns_make_at_most_their_share_of_the_sft_examples():
    from scope.profiles.sft import recommendation_mix

    turns = [(f"prompt {i}", f"answer {i}") for i in range(207)]
    mix = recommendation_mix(turns, n_profiles=149, share=0.2, seed=42)
    assert len(mix) == 37 and len(mix) / (len(mix) + 149) <= 0.2 + 1e-9   # round(0.25 * 149)
    assert mix == recommendation_mix(turns, 149, 0.2, seed=42) and set(mix) <= set(turns)   # seeded, a sample
    assert recommendation_mix(turns, 149, 0.0) == []
    assert len(recommendation_mix(turns[:10], 149, 0.5)) == 10   # never more turns than there are


def test_scoring_only_the_labelled_positions_keeps_the_loss_and_the_gradients(monkeypatch):
    """The CPU compaction of TRL's fused LM head (score_labelled_positions_only) is exact."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl.kernels.chunked_logprob import _use_triton as trl_default

    monkeypatch.setattr(trl_utils, "_use_triton", trl_default)   # TRL's own rule (an earlier training test patched it)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 300, (2, 24))
    labels = ids.clone()
    labels[0, :10], labels[1, :17] = -100, -100   # prompts of different lengths

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), out.entropy.detach(), [p.grad.clone() for p in model.parameters()]

    assert not trl_utils._use_triton(torch.device("cpu"))
    full = loss_and_grads()
    score_labelled_positions_only()
    score_labelled_positions_only()   # idempotent
    assert trl_utils._use_triton(torch.device("cpu"))
    compact = loss_and_grads()
    torch.testing.assert_close(compact[0], full[0])
    torch.testing.assert_close(compact[1], full[1])
    for a, b in zip(compact[2], full[2]):
        torch.testing.assert_close(a, b)
