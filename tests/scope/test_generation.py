"""Batched generation (scope.profiles.evaluation.generate): n samples of a prompt share one prefill."""

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
