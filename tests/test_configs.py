"""Every YAML recipe parses with its recipe's own parser and builds its trainer configuration, without a GPU.

In the spirit of torchtune's config validation: a typo in a GPU recipe (an unknown key, a wrong
type, an unknown optimiser or DiT preset, a LoRA / 4-bit setting TRL rejects) fails here, on a
laptop. The recipe of a config file is found by its name: ``<recipe>_*.yaml`` / ``<recipe>.yaml``
-> ``recipes/<recipe>.py`` (``demo_<recipe>.yaml`` are the main job's demo-sized versions), so a new
YAML whose name matches no recipe fails ``test_every_config_has_a_recipe``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE = [ROOT / "accelerate_config.yaml", *sorted((ROOT / "recipes" / "accelerate_configs").glob("*.yaml"))]

# recipe -> (module, names of the dataclasses scope.cli.parse_config reads, in order); complete and
# pituning parse with their own ``parse``, into the library's configs.
RECIPES = {
    "cohort": ("recipes.cohort", ["CohortArguments"]),
    "tensorize": ("recipes.tensorize", ["TensorizeArguments", "completion.tensors:TensorConfig", "scope.data.splits:UserSplitter"]),
    "sft": ("recipes.sft", ["SFTScriptArguments", "trl:SFTConfig", "trl:ModelConfig"]),
    "dpo": ("recipes.dpo", ["DPOScriptArguments", "trl:DPOConfig", "trl:ModelConfig"]),
    "evaluate": ("recipes.evaluate", ["EvaluateArguments"]),
    "embed": ("recipes.embed", ["EmbedArguments"]),
    "synthesize": ("recipes.synthesize", ["scope.synthesis.generation:SynthesisArguments", "trl:SFTConfig", "trl:ModelConfig"]),
    "complete": ("recipes.complete", None),
    "pituning": ("recipes.pituning", None),
    "demo": ("recipes.demo", ["DemoArguments"]),
}


def recipe_of(path: Path) -> str | None:
    stem = path.stem
    if stem == "demo":
        return "demo"
    stem = stem.removeprefix("demo_")
    return next((r for r in RECIPES if stem == r or stem.startswith(r + "_")), None)


def dataclasses_of(recipe: str) -> tuple[type, ...]:
    module_name, names = RECIPES[recipe]
    out = []
    for name in names:
        where, _, attr = name.rpartition(":")
        out.append(getattr(importlib.import_module(where or module_name), attr))
    return tuple(out)


def parse_recipe_config(recipe: str, path: Path) -> tuple:
    """What the recipe itself parses from the YAML file."""
    from scope.cli import parse_config

    module_name, names = RECIPES[recipe]
    if names is None:
        return (importlib.import_module(module_name).parse(["--config", str(path)]),)
    return parse_config(dataclasses_of(recipe), ["--config", str(path)])


@pytest.fixture
def as_if_bf16_gpu(monkeypatch):
    """GPU recipes set ``bf16: true``; TrainingArguments checks the device: pretend a bf16 GPU exists."""
    import transformers.training_args as training_args

    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)


def test_every_config_has_a_recipe():
    assert CONFIGS, "no configs found"
    orphans = [p.name for p in CONFIGS if recipe_of(p) is None]
    assert not orphans, f"configs whose name matches no recipe in {sorted(RECIPES)}: {orphans}"
    for recipe in {recipe_of(p) for p in CONFIGS}:
        assert (ROOT / "recipes" / f"{recipe}.py").exists(), recipe


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_builds(path, as_if_bf16_gpu):
    recipe = recipe_of(path)
    parsed = parse_recipe_config(recipe, path)
    check = globals().get(f"check_{recipe}")
    if check:
        check(path, *parsed)


def _model_config(model_args):
    """The peft LoRA config, and for QLoRA recipes the bitsandbytes 4-bit config (built, not applied)."""
    from trl import get_peft_config, get_quantization_config

    peft = get_peft_config(model_args)
    if model_args.use_peft:
        assert peft is not None and peft.r == model_args.lora_r and peft.task_type == "CAUSAL_LM"
    quant = get_quantization_config(model_args)
    if model_args.load_in_4bit:
        assert quant is not None and quant.load_in_4bit and quant.bnb_4bit_quant_type == model_args.bnb_4bit_quant_type
    return peft, quant


def check_sft(path, script_args, training_args, model_args):
    _model_config(model_args)
    assert training_args.max_steps > 0 or training_args.num_train_epochs > 0
    if model_args.load_in_4bit:
        assert training_args.bf16, f"{path.name}: QLoRA computes in bf16"


def check_dpo(path, script_args, training_args, model_args):
    _model_config(model_args)
    assert training_args.beta > 0
    assert script_args.sft_adapter, f"{path.name}: DPO trains on top of an SFT adapter"
    if "llama31" in path.stem:  # the paper-scale DPO continues the paper-scale SFT of the same base model
        from trl import ModelConfig, SFTConfig, TrlParser

        from recipes.sft import SFTScriptArguments
        kind = path.stem.rsplit("_", 1)[-1]
        sft = ROOT / "recipes" / "configs" / f"sft_llama31_8b_{kind}.yaml"
        _, sft_training, sft_model = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig)).parse_yaml_file(
            str(sft), allow_extra_keys=False)
        assert script_args.sft_adapter == sft_training.output_dir
        assert model_args.model_name_or_path == sft_model.model_name_or_path
        assert model_args.load_in_4bit == sft_model.load_in_4bit


def check_synthesize(path, script_args, training_args, model_args):
    _model_config(model_args)


def check_complete(path, cfg):
    from completion.dit import DIT_PRESETS
    from completion.masks import FIXED_MASKS

    assert cfg.model.preset in DIT_PRESETS, f"{path.name}: unknown preset {cfg.model.preset}"
    assert cfg.train.mask == "umask" or cfg.train.mask in FIXED_MASKS
    assert len(cfg.model.patch_size) == 3 and cfg.train.device in ("cpu", "cuda", "mps") or \
        cfg.train.device.startswith("cuda:")


def check_pituning(path, cfg):
    assert cfg.distillation.student.layers > 0 and 0 < cfg.samples.train_fraction + cfg.samples.val_fraction < 1


def check_demo(path, args):
    from recipes.demo import stages

    names = [s.name for s in stages(args)]
    assert names[0] == "cohort" and names[-1] == "report" and len(set(names)) == len(names)
    for field in [f for f in vars(args) if f.endswith("_config")]:
        assert (ROOT / getattr(args, field)).exists(), getattr(args, field)


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # accelerate's own ClusterConfig: unknown keys are an error
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"
