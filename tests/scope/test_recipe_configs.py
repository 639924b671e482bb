"""Every U-SCOPE YAML recipe parses into its dataclasses and builds its TRL config objects on a
machine without a GPU (a typo in a GPU recipe fails here, on a laptop)."""

from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser
from trl import DPOConfig, ModelConfig, SFTConfig, get_peft_config

from recipes import dpo, embed, evaluate, sft

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"
RECIPES = {
    "sft_cpu.yaml": (sft.SFTScriptArguments, SFTConfig, ModelConfig),
    "sft_llama31_8b_lora.yaml": (sft.SFTScriptArguments, SFTConfig, ModelConfig),
    "sft_llama31_8b_qlora.yaml": (sft.SFTScriptArguments, SFTConfig, ModelConfig),
    "dpo_cpu.yaml": (dpo.DPOScriptArguments, DPOConfig, ModelConfig),
    "embed.yaml": (embed.EmbedArguments,),
    "evaluate.yaml": (evaluate.EvaluateArguments,),
}


def parse(name: str, tmp_path: Path):
    values = yaml.safe_load((CONFIGS / name).read_text())
    if values.get("bf16") and not values.get("use_cpu"):
        values["use_cpu"] = True  # GPU recipe checked on CPU: only the bf16-on-GPU availability check is bypassed
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return HfArgumentParser(RECIPES[name]).parse_yaml_file(path, allow_extra_keys=False)


def test_every_uscope_recipe_is_listed():
    ours = {p.name for pattern in ("sft_*.yaml", "dpo_*.yaml", "embed*.yaml", "evaluate*.yaml") for p in CONFIGS.glob(pattern)}
    assert ours <= set(RECIPES), f"add {sorted(ours - set(RECIPES))} to RECIPES"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_its_config_objects(name, tmp_path):
    parsed = parse(name, tmp_path)
    if len(parsed) == 3:
        script, training, model = parsed
        assert training.output_dir and model.model_name_or_path
        peft = get_peft_config(model)
        assert peft is not None and peft.r == model.lora_r
        assert not training.gradient_checkpointing if "cpu" in name else training.gradient_checkpointing
        if "qlora" in name:
            assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4"
        if isinstance(training, SFTConfig):
            assert training.completion_only_loss


def test_unknown_key_is_named(tmp_path):
    values = yaml.safe_load((CONFIGS / "sft_cpu.yaml").read_text())
    values["lora_rr"] = 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match="lora_rr"):
        HfArgumentParser(RECIPES["sft_cpu.yaml"]).parse_yaml_file(tmp_path / "bad.yaml", allow_extra_keys=False)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "zero3.yaml"])
def test_accelerate_configs(name):
    cfg = yaml.safe_load((ROOT / "recipes" / "accelerate_configs" / name).read_text())
    assert cfg["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"} and cfg["num_processes"] >= 1
    default = yaml.safe_load((ROOT / "accelerate_config.yaml").read_text())
    assert default["distributed_type"] == "NO" and default["num_processes"] == 1
