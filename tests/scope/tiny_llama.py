"""A tiny Llama-3.1-architecture stand-in for ``meta-llama/Llama-3.1-8B-Instruct`` (no download): the
Llama module names (q/k/v/o_proj, gate/up/down_proj), grouped-query attention, llama3 RoPE scaling,
untied embeddings, and the Llama-3.1 chat template and special tokens (``<|begin_of_text|>``,
``<|start_header_id|>``, ``<|eot_id|>``) on the packaged SmolLM2 tokenizer's vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_TARGET_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

# Llama-3.1-Instruct's chat template without the tool-calling branches.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA31_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama31_tokenizer():
    """The SmolLM2 vocabulary with Llama-3.1's special tokens and chat template (no pad token, as Llama's)."""
    from scope.profiles.llms import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA31_SPECIAL})
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.pad_token = None
    tokenizer.chat_template = LLAMA31_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama31(out: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a random tiny Llama-3.1 (config, safetensors, tokenizer) to ``out``. The MLP is 4x wide (Llama's
    3.5x would give 224 inputs to down_proj): bitsandbytes' CPU inference kernel repacks a 4-bit weight in
    blocks of 64 inputs x 32 outputs, which Llama-3.1-8B's 4096 / 14336 / 1024 satisfy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = llama31_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=ids("<|begin_of_text|>"), eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
