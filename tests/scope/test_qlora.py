"""QLoRA on the CPU (bitsandbytes >= 0.47 runs NF4 there).

The paper-scale QLoRA recipes, ``sft_llama31_8b_qlora.yaml`` then ``dpo_llama31_8b_qlora.yaml``, run
a few real steps through ``recipes/sft.py`` and ``recipes/dpo.py`` on a tiny Llama-3.1 stand-in
(tests/scope/tiny_llama.py). Only the model path is overridden among the model keys; the rest of
the overrides are the CPU switches (``use_cpu``, ``bf16: false``), sizes (steps, batch, length,
warm-up) and where data and outputs live. Then: merging an adapter into a 4-bit base, 8-bit on the
CPU, and the error when bitsandbytes has no backend for the device.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import is_peft_model
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from trl import DPOConfig, ModelConfig, SFTConfig

from recipes import dpo as dpo_recipe
from recipes import sft as sft_recipe
from scope.cli import parse_config
from scope.profiles.llms import (QuantizationUnsupportedError, load_model, load_student, merge_adapter,
                                 quantized_bits)
from tests.scope.tiny_llama import LLAMA_TARGET_MODULES, build_tiny_llama31

bnb = pytest.importorskip("bitsandbytes")
CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
CPU = ["--use_cpu", "true", "--bf16", "false"]


def sizes(steps: int) -> list[str]:
    return ["--max_steps", str(steps), "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--max_length", "1024", "--warmup_steps", "0", "--logging_steps", "1"]


def places(out: Path, cohort: Path) -> list[str]:
    return ["--output_dir", str(out), "--cohort_dir", str(cohort), "--teacher_cache_dir", str(out.parent / "cache"),
            "--eval_strategy", "no", "--eval_users", "0", "--report_to", "none", "--threads", "1"]


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def recording(trainer_class, store: dict):
    """The recipe's trainer class, keeping the instance and its adapter weights before training."""
    class Recording(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            store["trainer"], store["initial"] = self, lora_state(self.model)
    return Recording


def run_recipe(module, trainer_name: str, types: tuple, argv: list[str]) -> SimpleNamespace:
    args = parse_config(types, argv)
    store: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, trainer_name, recording(getattr(module, trainer_name), store))
        metrics = module.main(*args)
    return SimpleNamespace(args=args, metrics=metrics, out=Path(args[1].output_dir), **store)


def model_overrides(argv: list[str]) -> set[str]:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return {a[2:] for a in argv if a.startswith("--") and a[2:] in fields}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama31(tmp_path_factory.mktemp("tiny-llama31"))


@pytest.fixture(scope="module")
def sft_run(llama_dir, small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "sft"
    argv = ["--config", str(CONFIGS / "sft_llama31_8b_qlora.yaml"), "--model_name_or_path", str(llama_dir),
            *CPU, *sizes(2), *places(out, small_cohort)]
    assert model_overrides(argv) == {"model_name_or_path"}
    return run_recipe(sft_recipe, "SFTTrainer", (sft_recipe.SFTScriptArguments, SFTConfig, ModelConfig), argv)


@pytest.fixture(scope="module")
def dpo_run(sft_run, llama_dir, small_cohort):
    out = sft_run.out.parent / "dpo"
    argv = ["--config", str(CONFIGS / "dpo_llama31_8b_qlora.yaml"), "--model_name_or_path", str(llama_dir),
            *CPU, *sizes(2), *places(out, small_cohort), "--sft_adapter", str(sft_run.out), "--eval_pairs", "0",
            "--student_negative_users", "1", "--student_max_new_tokens", "8", "--student_negative_cases", "2",
            "--recommend_max_new_tokens", "8"]
    assert model_overrides(argv) == {"model_name_or_path"}
    return run_recipe(dpo_recipe, "DPOTrainer", (dpo_recipe.DPOScriptArguments, DPOConfig, ModelConfig), argv)


def assert_qlora_model(model, model_args):
    """Every Llama projection carries a LoRA over a bitsandbytes NF4 layer computing in the YAML's dtype."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    n_layers = model.config.num_hidden_layers
    assert {name.rsplit(".", 1)[-1] for name in layers} == LLAMA_TARGET_MODULES
    assert len(layers) == len(LLAMA_TARGET_MODULES) * n_layers
    compute = getattr(torch, model_args.dtype)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit), f"{name}: {type(base).__name__}"
        assert base.weight.quant_state.quant_type == model_args.bnb_4bit_quant_type and base.compute_dtype == compute
    quant = model.config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    assert quant["load_in_4bit"] and quant["bnb_4bit_use_double_quant"] == model_args.use_bnb_nested_quant
    assert quantized_bits(model) == 4


def assert_adapter_trained(run):
    final = lora_state(run.trainer.model)
    assert final.keys() == run.initial.keys() and final
    unchanged_b = [n for n in final if "lora_B" in n and torch.equal(final[n], run.initial[n])]
    assert not unchanged_b, f"LoRA B matrices that did not move: {unchanged_b[:3]}"
    assert run.trainer.state.global_step == run.args[1].max_steps and math.isfinite(run.metrics["train_loss"])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def sample_ids(trainer, n: int = 128) -> torch.Tensor:
    row = trainer.train_dataset[0]
    ids = row["input_ids"] if "input_ids" in row else row["prompt_ids"] + row["chosen_ids"]
    return torch.tensor([ids[:n]])


def test_qlora_sft_recipe_trains_a_4bit_llama_on_cpu(sft_run):
    _, training, model_args = sft_run.args
    assert (model_args.load_in_4bit, model_args.dtype, model_args.attn_implementation) == (True, "bfloat16", "sdpa")
    assert training.optim == "paged_adamw_8bit" and training.gradient_checkpointing and training.use_cpu
    model = sft_run.trainer.model
    assert_qlora_model(model, model_args)
    assert model.config._attn_implementation == "sdpa"
    assert_adapter_trained(sft_run)
    assert (sft_run.out / "adapter_model.safetensors").exists() and (sft_run.out / "chat_template.jinja").exists()

    # the saved adapter on a fresh 4-bit base is the trained model
    ids = sample_ids(sft_run.trainer)
    expected = logits(model, ids)
    reloaded = PeftModel.from_pretrained(load_model(model_args, training), sft_run.out, autocast_adapter_dtype=False)
    assert_qlora_model(reloaded, model_args)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)
    upcast = PeftModel.from_pretrained(load_model(model_args, training), sft_run.out)   # PEFT's default: fp32 LoRA
    torch.testing.assert_close(logits(upcast, ids), expected, rtol=2e-2, atol=2e-2)


def completion_logps(model, batch) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens of a DPO batch ([chosen..., rejected...])."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = out[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def test_qlora_dpo_recipe_on_the_merged_sft_student_with_the_adapter_disabled_reference(dpo_run, sft_run):
    script, training, model_args = dpo_run.args
    assert (model_args.load_in_4bit, model_args.dtype) == (True, "bfloat16") and script.sft_adapter == str(sft_run.out)
    assert "student" in dpo_run.metrics["pairs_by_kind"]
    trainer = dpo_run.trainer
    assert_qlora_model(trainer.model, model_args)
    assert_adapter_trained(dpo_run)

    # the reference policy is the policy with its adapter disabled: the merged, quantized SFT student
    assert trainer.ref_model is None and is_peft_model(trainer.model)   # what DPOTrainer tests to disable the adapter
    student = load_student(model_args, [script.sft_adapter], training_args=training)
    assert quantized_bits(student) == 4
    batch = trainer.data_collator([trainer.train_dataset[0]])
    batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    student_logps = completion_logps(student, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]).float(), student_logps, rtol=2e-3, atol=0.5)
    ids = batch["input_ids"][:1, :128]
    with trainer.model.disable_adapter():
        disabled = logits(trainer.model, ids)
    torch.testing.assert_close(disabled, logits(student, ids), rtol=0, atol=0)
    policy = logits(trainer.model, ids)
    assert not torch.equal(policy, disabled), "the trained adapter changes the policy"

    # the saved DPO adapter on a fresh merged student is the trained policy
    reloaded = PeftModel.from_pretrained(load_student(model_args, [script.sft_adapter], training_args=training),
                                         dpo_run.out, autocast_adapter_dtype=False)
    torch.testing.assert_close(logits(reloaded, ids), policy, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# merging into a 4-bit base
# --------------------------------------------------------------------------------------------

def q4(path, dtype="float32") -> ModelConfig:
    return ModelConfig(model_name_or_path=str(path), dtype=dtype, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                       use_bnb_nested_quant=True)


@pytest.fixture(scope="module")
def trained_adapter(llama_dir, tmp_path_factory) -> Path:
    """A LoRA on every Llama projection with a visible update (B drawn as after training: 2-4% of W)."""
    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1)
    model = get_peft_model(load_model(ModelConfig(model_name_or_path=str(llama_dir))),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2e-3)
    model.save_pretrained(out)
    return out


def projections(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGET_MODULES}


def weights(model) -> dict[str, torch.Tensor]:
    """Each projection's weight as float32 (4-bit ones de-quantized)."""
    out = {}
    for name, module in projections(model).items():
        w = module.weight
        out[name] = (bnb.functional.dequantize_4bit(w.data, w.quant_state) if isinstance(module, bnb.nn.Linear4bit)
                     else w.data).float()
    return out


def test_adapter_merged_into_a_4bit_base_matches_the_fp32_merge(llama_dir, trained_adapter, tmp_path):
    plain = ModelConfig(model_name_or_path=str(llama_dir), dtype="float32")
    w = weights(load_model(plain))
    fp32_merged = load_student(plain, [trained_adapter])
    m = weights(fp32_merged)
    merged4 = load_student(q4(llama_dir), [trained_adapter])
    assert quantized_bits(merged4) == 4 and all(isinstance(x, bnb.nn.Linear4bit) for x in projections(merged4).values())
    d4, q0 = weights(merged4), weights(load_model(q4(llama_dir)))
    for name in m:
        delta = m[name] - w[name]
        assert delta.norm() > 0.01 * w[name].norm()                               # the adapter is not negligible
        nf4_error = ((q0[name] - w[name]).norm() / w[name].norm()).item()         # NF4's own rounding of W
        error = ((d4[name] - m[name]).norm() / m[name].norm()).item()
        kept = ((d4[name] - q0[name]) * delta).sum() / (delta * delta).sum()     # share of BA that survived
        assert error < 1.1 * nf4_error and error < 0.12, (name, error, nf4_error)
        assert kept > 0.8, (name, kept.item())
    # exactly what quantizing the saved fp32 merge gives (the adapter is merged once, then quantized once)
    fp32_merged.save_pretrained(tmp_path / "merged")
    reference = weights(load_model(q4(tmp_path / "merged")))
    assert all(torch.equal(d4[n], reference[n]) for n in d4)
    # and the merged 4-bit student predicts like the fp32 merge
    ids = torch.randint(0, fp32_merged.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    exact, approx = logits(fp32_merged, ids), logits(merged4, ids)
    assert torch.nn.functional.cosine_similarity(exact.flatten(), approx.flatten(), dim=0) > 0.98


def test_merging_into_an_already_quantized_model_is_refused(llama_dir, trained_adapter):
    quantized = load_model(q4(llama_dir))
    with pytest.raises(ValueError, match=r"4-bit model: PEFT would re-quantize W \+ BA"):
        merge_adapter(quantized, str(trained_adapter))
    # why: PEFT's own merge re-quantizes W + BA onto W's NF4 grid and keeps little of the update
    w, m = weights(load_model(ModelConfig(model_name_or_path=str(llama_dir)))), \
        weights(load_student(ModelConfig(model_name_or_path=str(llama_dir)), [trained_adapter]))
    q0 = weights(quantized)
    naive = weights(PeftModel.from_pretrained(load_model(q4(llama_dir)), trained_adapter).merge_and_unload())
    kept = [(((naive[n] - q0[n]) * (m[n] - w[n])).sum() / ((m[n] - w[n]) ** 2).sum()).item() for n in m]
    assert sum(kept) / len(kept) < 0.5, kept


def test_8bit_loads_and_runs_on_cpu(llama_dir, trained_adapter):
    q8 = ModelConfig(model_name_or_path=str(llama_dir), load_in_8bit=True)
    for model in (load_model(q8), load_student(q8, [trained_adapter])):
        assert quantized_bits(model) == 8
        assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in projections(model).values())
        assert torch.isfinite(logits(model, torch.tensor([[1, 2, 3, 4]]))).all()


@pytest.mark.parametrize("version, devices, message", [
    ("0.46.1", {"cpu", "cuda"}, "bitsandbytes 0.46.1 has no cpu backend .*>= 0.47.0 runs them on the CPU"),
    ("0.50.2", {"cuda"}, "bitsandbytes 0.50.2 has no cpu backend"),
])
def test_quantizing_on_a_device_bitsandbytes_cannot_run_is_a_clear_error(llama_dir, monkeypatch, version, devices,
                                                                          message):
    if torch.cuda.is_available():
        pytest.skip("loads onto the GPU")
    monkeypatch.setattr(bnb, "__version__", version)
    monkeypatch.setattr(bnb, "supported_torch_devices", devices)
    with pytest.raises(QuantizationUnsupportedError, match=message) as err:
        load_model(q4(llama_dir))
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)  # one line from a recipe
    with pytest.raises(ValueError, match="only apply with load_in_4bit"):
        load_model(dataclasses.replace(q4(llama_dir), load_in_4bit=False))


def test_an_eval_forward_does_not_break_4bit_training_gradients(llama_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first no-grad eval forward (on AVX512-BF16
    CPUs) and its repacked kernel has no autograd; the loader turns that off, so generating (DPO's student
    negatives) or evaluating before / between training steps leaves the LoRA gradients exact."""
    ids = torch.randint(0, 49000, (1, 48), generator=torch.Generator().manual_seed(0))

    def lora_grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = get_peft_model(load_model(q4(llama_dir, "bfloat16")),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if eval_first:
            logits(model, ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    fresh, after_eval = lora_grads(False), lora_grads(True)
    assert fresh.keys() == after_eval.keys() and fresh
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=0, atol=0, msg=name)
