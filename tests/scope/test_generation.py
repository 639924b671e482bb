"""Batched generation (scope.profiles.evaluation.generate): n samples of a prompt share one prefill."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scope.profiles.evaluation import shared_prefix_cache


def test_a_shared_prefix_cache_decodes_as_n_separate_prefills():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0                       # a left-padded shorter prompt
    rows = {"input_ids": ids.repeat_interleave(3, 0), "attention_mask": mask.repeat_interleave(3, 0)}
    with torch.no_grad():
        plain = model.generate(**rows, max_new_tokens=6, do_sample=False, pad_token_id=0)
        shared = model.generate(**rows, cache=shared_prefix_cache(model, ids, mask, 3), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)
    assert torch.equal(plain, shared)
    torch.manual_seed(1)
    with torch.no_grad():
        sampled = model.generate(**rows, cache=shared_prefix_cache(model, ids, mask, 3), max_new_tokens=6,
                                 do_sample=True, pad_token_id=0)
    assert sampled.shape == plain.shape and not torch.equal(sampled[0], sampled[1])   # copies sample apart


def test_bfloat16_generation_keeps_attention_and_the_kv_cache_in_float32():
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from scope.profiles.llms import generation_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    assert generation_model(model, "float32") is model
    original = copy.deepcopy(model)
    mixed = generation_model(model, "bfloat16", copy_weights=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())                 # the original trains on in fp32
    assert all(p.dtype == torch.bfloat16 for p in mixed.parameters())
    ids = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        out = mixed(input_ids=ids, use_cache=True)
        reference = original(input_ids=ids).logits
    layer = out.past_key_values.layers[0]
    assert layer.keys.dtype == torch.float32 and layer.values.dtype == torch.float32   # cache and softmax in fp32
    assert torch.allclose(out.logits.float(), reference, atol=0.05)                   # bf16 weights: close, not equal
    with torch.no_grad():
        generated = mixed.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (3, 17)
    with pytest.raises(ValueError, match="q_proj / k_proj / v_proj"):
        generation_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)), "bfloat16")
    with pytest.raises(ValueError, match="inference_dtype must be one of"):
        generation_model(model, "float16")
