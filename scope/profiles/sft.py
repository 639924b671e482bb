"""SFT / chain-of-thought distillation (U-SCOPE section 5.1): a LoRA student learns to answer the
structured prompt with the teacher's reasoning + profile JSON.

Data: one conversational *prompt-completion* example per user, built with HF ``datasets``:
``prompt = [system, user]`` (the structured prompt), ``completion = [assistant]`` (teacher CoT +
profile JSON). TRL's ``SFTTrainer`` renders both with the tokenizer's chat template and computes
the loss on the completion tokens only (``completion_only_loss``): this is the assistant-only
loss, and it works with any chat template (SmolLM2's ChatML, Llama 3.1's headers) without
``{% generation %}`` markers. The assistant turn ends with the template's end-of-turn token
(``<|im_end|>`` for SmolLM2, ``<|eot_id|>`` for Llama 3.1), which lies inside the completion and
is therefore trained; the model's ``eos_token_id`` is set to it, so generation stops there.

Decision: each example is a conversational prompt-completion pair, so TRL's
``completion_only_loss`` trains only the assistant turn, its end-of-turn token included, whatever
the chat template. SmolLM2's template has no ``{% generation %}`` markers, so
``assistant_only_loss`` cannot be used; :func:`set_stop_token` makes generation stop on that token.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import yaml
from safetensors import safe_open
from datasets import Dataset

from scope.io import write_text
from scope.profiles.corpus import ProfileCorpus

log = logging.getLogger(__name__)


def chat_example(prompt, profile_json: str, user_id: int) -> dict:
    return {"prompt": prompt.messages, "completion": [{"role": "assistant", "content": profile_json}], "user_id": user_id}


def sft_dataset(corpus: ProfileCorpus, splits: list[str] | tuple[str, ...] = ("train",),
                recommendations: list[tuple] = ()) -> Dataset:
    """Prompt-completion chat examples of the users of ``splits`` that have a teacher profile (with
    ``train``, also the corpus's ``synthetic`` users: ``ProfileDataArguments.synthetic_ratio``), then
    the teacher's ``recommendations`` ((prompt, answer JSON) of the novelty task,
    :meth:`scope.profiles.novelty.NoveltyTask.teacher_examples`); column ``task`` tells them apart."""
    users = corpus.profiled(*splits)
    if "train" in splits and "synthetic" not in splits:   # augmentation: synthetic users join train only
        users += corpus.profiled("synthetic")
    if not users:
        raise ValueError(f"no profiled users in splits {list(splits)}: the cohort is too small or the teacher failed")
    rows = [{**chat_example(corpus.prompts[u], corpus.results[u].profile.to_json(), u), "task": "profile"} for u in users]
    rows += [{**chat_example(prompt, answer, prompt.user_id), "task": "recommend"} for prompt, answer in recommendations]
    return Dataset.from_list(rows)


def recommendation_mix(examples: list[tuple], n_profiles: int, share: float, seed: int = 0) -> list[tuple]:
    """The recommendation turns SFT mixes into ``n_profiles`` profile examples: a seeded sample of
    ``examples`` such that they make up at most ``share`` of the mix.

    Decision (measured in the demo, issue 25): a shuffled mix of every training case (207 turns
    against 149 profiles) left a 48-step run about 20 profile examples; its held-out profiles
    repeated one intent until ``max_new_tokens`` (schema-valid 0 of 20). The profile, the longer
    answer, keeps most of the steps; the novelty stage decodes recommendations constrained and DPO
    trains them further."""
    n = min(len(examples), round(share / (1 - share) * n_profiles)) if share > 0 else 0
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked]


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in the tokenizer's chat template."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = text[text.rindex("PROBE") + len("PROBE"):]
    for token in tokenizer.all_special_tokens:
        if token and token in tail:
            return token
    return tokenizer.eos_token


def set_stop_token(model, tokenizer) -> str:
    """Make generation stop at the end-of-turn token (the last token trained in each example)."""
    token = end_of_turn_token(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(token)
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if token_id not in ids:
        model.generation_config.eos_token_id = [token_id, *ids]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return token


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder of a run, if any (training resumes from it)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
               and (p / "trainer_state.json").exists()]
    return str(max(folders, key=lambda p: int(p.name.split("-")[1]))) if folders else None


def check_adapter(folder: str | Path) -> None:
    """A saved LoRA adapter holds LoRA weights: ``adapter_model.safetensors`` has at least one
    ``lora_A`` and one ``lora_B`` tensor and no empty one. ZeRO-3 without
    ``stage3_gather_16bit_weights_on_model_save`` has saved zero-size tensors (trl#4416,
    peft#2892); FSDP with ``SHARDED_STATE_DICT`` saves no file at all."""
    path = Path(folder) / "adapter_model.safetensors"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: the adapter was not saved (FSDP: the final save needs "
                           "FULL_STATE_DICT)")
    with safe_open(str(path), framework="pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    empty = sorted(name for name, shape in shapes.items() if 0 in shape or not shape)
    if empty or not any("lora_A" in n for n in shapes) or not any("lora_B" in n for n in shapes):
        raise RuntimeError(f"{path}: an empty LoRA adapter ({len(shapes)} tensors, empty: {empty[:3]}); under "
                           "ZeRO-3 set zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save)")


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, used by its SFT and DPO
    trainers) project only the positions that carry a label on the CPU too.

    TRL compacts to the labelled positions on Triton devices only, so that compiled backends (Neuron)
    do not recompile for every batch shape; elsewhere it scores every position, prompt included, and
    masks the result. Eager CPU training has nothing to recompile, and the prompt is about half of a
    profile example, so scoring every position only costs time: the loss and the gradients are the
    same (tests/scope/test_sft.py), and one demo SFT step (790 tokens, 350 labelled) takes about a
    third less time (benchmarks/README.md#the-main-job-measured)."""
    import trl.trainer.utils as trl_utils

    uses_triton = trl_utils._use_triton
    if getattr(uses_triton, "compacts_cpu", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or uses_triton(device)

    compact.compacts_cpu = True
    trl_utils._use_triton = compact


def train_and_save(trainer, tokenizer, out_dir: str | Path, resume: bool = True):
    """Train (continuing from the newest checkpoint in ``out_dir`` when ``resume``; only the labelled
    positions scored, :func:`score_labelled_positions_only`), then save the adapter (checked by
    :func:`check_adapter`) and the tokenizer there, from rank 0 only. Returns the train output and
    the checkpoint resumed from."""
    score_labelled_positions_only()
    checkpoint = last_checkpoint(out_dir) if resume else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_fsdp_enabled:  # sharded checkpoints: the adapter file needs the full state dict
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out_dir))  # on every rank (a collective under FSDP / ZeRO-3); rank 0 writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out_dir))
        if (Path(out_dir) / "adapter_config.json").exists():
            check_adapter(out_dir)
    trainer.accelerator.wait_for_everyone()
    return result, checkpoint


def _plain(obj):
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, default=str))


def write_model_card(out_dir: str | Path, *, title: str, base_model: str, stage: str, configs: dict, metrics: dict,
                     notes: str = "") -> Path:
    """``README.md`` with YAML front matter (base model, tags) + config and metrics (also as JSON)."""
    out_dir = Path(out_dir)
    front = {"base_model": base_model, "library_name": "peft", "tags": ["uscope", stage, "lora", "trl"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Configuration", ""]
    for name, cfg in configs.items():
        lines += [f"### {name}", "", "```yaml", yaml.safe_dump(_plain(cfg), sort_keys=True).strip(), "```", ""]
    path = out_dir / "README.md"
    write_text(path, "\n".join(lines))
    write_text(out_dir / "metrics.json", json.dumps(_plain(metrics), indent=2) + "\n")
    return path
