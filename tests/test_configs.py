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
import yaml

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
    "novelty": ("recipes.novelty", ["NoveltyArguments"]),
    "embed": ("recipes.embed", ["EmbedArguments"]),
    "synthesize": ("recipes.synthesize", ["scope.synthesis.generation:SynthesisArguments", "trl:SFTConfig", "trl:ModelConfig"]),
    "complete": ("recipes.complete", None),
    "pituning": ("recipes.pituning", None),
    "demo": ("recipes.demo", ["DemoArguments"]),
    "teacher": ("recipes.teacher", ["TeacherBatchArguments"]),
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
    assert script_args.student_samples == yaml.safe_load(path.read_text())["student_samples"] == 4  # ranked pairs
    # the SFT anchor (the NLL of y_w) keeps the answers valid JSON: every DPO recipe, CPU and GPU, has it
    assert list(training_args.loss_type) == ["sigmoid", "sft"] and len(training_args.loss_weights) == 2, path.name
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
    raw = yaml.safe_load(path.read_text())   # the routine prior's keys reach the configs they set
    assert cfg.predictor.routine == raw["predictor"]["routine"]
    assert cfg.samples.routine_backoff == raw["samples"]["routine_backoff"]


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


# --------------------------------------------------------------------------------------------
# Every model setting of a YAML reaches the model the recipe builds
# --------------------------------------------------------------------------------------------
# recipe -> how it builds its model(s) from the parsed config (the functions its ``main`` calls); each
# module lists the trl.ModelConfig keys it honours in ``MODEL_KEYS``.
MODEL_RECIPES = ("sft", "dpo", "synthesize")
MODEL_CONFIGS = [p for p in CONFIGS if recipe_of(p) in MODEL_RECIPES]
# ModelConfig keys that only mean something with another key set
ONLY_WITH = {"bnb_4bit_quant_type": "load_in_4bit", "use_bnb_nested_quant": "load_in_4bit",
             "bnb_4bit_quant_storage": "load_in_4bit", **{k: "use_peft" for k in (
                 "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                 "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")}}


def _raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def unread_model_keys(recipe: str, raw: dict) -> list[str]:
    """The model keys a YAML sets that its recipe does not read: ModelConfig keys outside the recipe's
    ``MODEL_KEYS``, training keys the recipes refuse (``model_init_kwargs``), and keys whose switch is off."""
    import dataclasses

    from trl import ModelConfig

    from scope.profiles.llms import REFUSED_TRAINING_KEYS

    honoured = importlib.import_module(RECIPES[recipe][0]).MODEL_KEYS
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unread = [k for k in raw if k in fields and k not in honoured]
    unread += [k for k in raw if k in REFUSED_TRAINING_KEYS]
    unread += [f"{k} (without {switch})" for k, switch in ONLY_WITH.items() if k in raw and not raw.get(switch)]
    return unread


def test_recipes_honour_only_real_model_keys():
    import dataclasses

    from trl import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for recipe in MODEL_RECIPES:
        keys = importlib.import_module(RECIPES[recipe][0]).MODEL_KEYS
        assert set(keys) <= fields, f"{recipe}: {sorted(set(keys) - fields)} are not trl.ModelConfig keys"


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=[p.name for p in MODEL_CONFIGS])
def test_config_sets_only_model_keys_its_recipe_reads(path):
    unread = unread_model_keys(recipe_of(path), _raw(path))
    assert not unread, f"{path.name} sets model keys {recipe_of(path)} does not read: {unread}"


def test_a_model_key_the_recipe_does_not_read_is_an_error(monkeypatch):
    import recipes.sft

    path = ROOT / "recipes" / "configs" / "sft_llama31_8b_qlora.yaml"
    keys = tuple(k for k in recipes.sft.MODEL_KEYS if k != "attn_implementation")
    monkeypatch.setattr(recipes.sft, "MODEL_KEYS", keys)
    assert unread_model_keys("sft", _raw(path)) == ["attn_implementation"]
    assert unread_model_keys("sft", {"bnb_4bit_quant_type": "fp4"}) == ["bnb_4bit_quant_type (without load_in_4bit)"]
    assert unread_model_keys("dpo", {"model_init_kwargs": {"dtype": "bfloat16"}}) == ["model_init_kwargs"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A tiny Llama-3.1 for the YAMLs that name an 8B Hub model (no download)."""
    from tests.scope.tiny_llama import build_tiny_llama31

    return build_tiny_llama31(tmp_path_factory.mktemp("stand-in"))


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[tuple[str, str, dict]]:
    """The (class, path, kwargs) of every AutoModelForCausalLM / AutoTokenizer.from_pretrained call."""
    import transformers

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(path, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, str(path), kwargs))
            return _original(path, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def _adapter_for(model_args, out: Path) -> Path:
    """A LoRA folder for the recipe's base (the SFT adapter DPO merges, the trace LM generate merges)."""
    from peft import LoraConfig, get_peft_model
    from trl import ModelConfig

    from scope.profiles.llms import load_model

    base = load_model(ModelConfig(model_name_or_path=model_args.model_name_or_path, dtype="float32"))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    return out


def built_models(recipe: str, parsed: tuple, adapter: Path) -> dict:
    """What the recipe builds for training / generation, through its own functions (``adapter``: the
    SFT adapter DPO merges, the trained trace LM synthesize's generate stage merges)."""
    import recipes.dpo
    import recipes.sft
    import recipes.synthesize

    script_args, training_args, model_args = parsed
    if recipe == "sft":
        return {"sft": recipes.sft.build_model(model_args, training_args)[1]}
    if recipe == "dpo":
        script_args.sft_adapter = str(adapter)
        return {"dpo student": recipes.dpo.build_student(script_args, training_args, model_args)[1]}
    return {"synthesize train": recipes.synthesize.trace_lm(model_args, training_args),
            "synthesize generate": recipes.synthesize.trained_trace_lm(model_args, training_args, adapter)}


def check_live_model(where: str, model, model_args, training_args, calls: list[tuple[str, str, dict]]) -> None:
    """Each ModelConfig setting against the live model object."""
    import bitsandbytes as bnb
    from torch import nn

    from scope.profiles.llms import quantized_bits, resolve_model, torch_dtype

    path = resolve_model(model_args.model_name_or_path)
    assert model.config._name_or_path == path, where
    dtype = torch_dtype(model_args.dtype)
    loads = [(cls, kw) for cls, p, kw in calls if p == path]
    assert any(cls == "AutoModelForCausalLM" for cls, _ in loads), f"{where}: {path} was never loaded"
    for cls, kwargs in loads:  # revision and trust_remote_code reach every load of the model and its tokenizer
        assert kwargs.get("revision") == model_args.model_revision, f"{where}: {cls}"
        assert kwargs.get("trust_remote_code") == training_args.trust_remote_code, f"{where}: {cls}"
        if cls == "AutoModelForCausalLM":  # asked for explicitly, not left to a default that happens to agree
            assert kwargs.get("dtype") == dtype, where
            assert kwargs.get("attn_implementation") == model_args.attn_implementation, where
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    floats = {p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert model.dtype == dtype and floats == {dtype}, f"{where}: {model.dtype}, {floats} != {dtype}"
    if model_args.attn_implementation:
        assert model.config._attn_implementation == model_args.attn_implementation, where
    quant = getattr(model.config, "quantization_config", None)
    if model_args.load_in_4bit:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == model_args.bnb_4bit_quant_type, where
        assert quant["bnb_4bit_use_double_quant"] == model_args.use_bnb_nested_quant, where
        assert quant["bnb_4bit_compute_dtype"] == str(dtype).removeprefix("torch."), where
        assert quant["bnb_4bit_quant_storage"] == (model_args.bnb_4bit_quant_storage or "uint8"), where
        assert quantized_bits(model) == 4 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values()), where
        for name, module in linears.items():
            state = module.weight.quant_state
            assert state.quant_type == model_args.bnb_4bit_quant_type, f"{where}: {name}"
            assert state.nested == model_args.use_bnb_nested_quant and module.compute_dtype == dtype, f"{where}: {name}"
    elif model_args.load_in_8bit:
        assert quantized_bits(model) == 8 and all(isinstance(m, bnb.nn.Linear8bitLt) for m in linears.values()), where
    else:
        assert quant is None and quantized_bits(model) is None, where


def check_live_lora(where: str, model, model_args) -> None:
    """The LoRA the trainer wraps around the model (``trl.get_peft_config``, as SFTTrainer / DPOTrainer do)."""
    import math

    from peft import PeftModelForCausalLM, get_peft_model
    from peft.tuners.lora import LoraLayer
    from torch import nn
    from trl import get_peft_config

    targets = model_args.lora_target_modules
    linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or
               type(m).__name__ in ("Linear4bit", "Linear8bitLt")} - {"lm_head"}
    peft_model = get_peft_model(model, get_peft_config(model_args))
    assert isinstance(peft_model, PeftModelForCausalLM) == (model_args.lora_task_type == "CAUSAL_LM"), where
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    expected = linears if targets == "all-linear" else set([targets] if isinstance(targets, str) else targets)
    assert {n.rsplit(".", 1)[-1] for n in layers} == expected, where
    scale = model_args.lora_alpha / (math.sqrt(model_args.lora_r) if model_args.use_rslora else model_args.lora_r)
    for name, layer in layers.items():
        assert layer.r["default"] == model_args.lora_r and layer.lora_alpha["default"] == model_args.lora_alpha, name
        assert math.isclose(layer.scaling["default"], scale), name
        dropout = layer.lora_dropout["default"]
        assert (dropout.p if isinstance(dropout, nn.Dropout) else 0.0) == model_args.lora_dropout, name
        assert ("default" in layer.lora_magnitude_vector) == model_args.use_dora, name


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=[p.name for p in MODEL_CONFIGS])
def test_every_model_setting_reaches_the_model(path, as_if_bf16_gpu, stand_in, from_pretrained_calls, tmp_path):
    """Build what the recipe builds (a tiny Llama-3.1 where the YAML names an 8B Hub model) and compare each
    ModelConfig setting with the live object: dtype, attention, 4-bit layers and their quantization, revision,
    trust_remote_code, the LoRA."""
    pytest.importorskip("bitsandbytes")
    from scope.profiles.llms import EMBEDDER, SMOLLM2

    recipe = recipe_of(path)
    parsed = parse_recipe_config(recipe, path)
    model_args = parsed[2]
    if model_args.model_name_or_path not in (SMOLLM2, EMBEDDER) and not Path(model_args.model_name_or_path).exists():
        model_args.model_name_or_path = str(stand_in)           # the 8B Hub model of a paper-scale recipe
    adapter = _adapter_for(model_args, tmp_path / "adapter")
    from_pretrained_calls.clear()                                # only the recipe's own loads from here
    for where, model in built_models(recipe, parsed, adapter).items():
        check_live_model(f"{path.name} ({where})", model, model_args, parsed[1], from_pretrained_calls)
        if model_args.use_peft:
            check_live_lora(f"{path.name} ({where})", model, model_args)
