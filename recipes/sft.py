"""SFT / CoT distillation of a LoRA student (U-SCOPE section 5.1).

    accelerate launch recipes/sft.py                      # CPU default: recipes/configs/sft_cpu.yaml
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/sft.py \
        --config recipes/configs/sft_llama31_8b_lora.yaml

Simulated (or given) cohort -> structured prompts -> teacher profiles (cached) -> TRL SFTTrainer
with a peft LoRA (QLoRA with ``load_in_4bit: true``). Saves the adapter, the tokenizer, a model
card (config + metrics) and TensorBoard logs under ``output_dir``; resumes from its last
checkpoint.
"""

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from scope.cli import parse_config, run_recipe, use_threads
from scope.profiles.corpus import ProfileDataArguments, build_corpus
from scope.profiles.evaluation import held_out_metrics
from scope.profiles.llms import LOADER_KEYS, LORA_KEYS, load_model, load_model_tokenizer
from scope.profiles.novelty import NoveltyTask
from scope.profiles.prompts import PromptBuilder
from scope.profiles.sft import recommendation_mix, set_stop_token, sft_dataset, train_and_save, write_model_card

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft_cpu.yaml"
# The trl.ModelConfig keys this recipe honours: the loader's (scope.profiles.llms.load_model) and the LoRA's.
MODEL_KEYS = LOADER_KEYS + LORA_KEYS


@dataclass
class SFTScriptArguments(ProfileDataArguments):
    eval_users: int = 2                  # held-out (test) users the student answers after training; 0 = skip
    eval_max_new_tokens: int = 512
    resume: bool = True                  # continue from the last checkpoint in output_dir
    threads: int = 0                 # CPU training: torch threads per process (0 = all cores / processes)


def build_model(model_args: ModelConfig, training_args: SFTConfig):
    """The tokenizer and the base model the trainer gets (every ModelConfig key of the loader applied;
    4-/8-bit with ``load_in_4bit`` / ``load_in_8bit``: QLoRA, on a GPU or the CPU)."""
    return load_model_tokenizer(model_args, training_args), load_model(model_args, training_args)


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    start = time.perf_counter()
    use_threads(script_args.threads, training_args.use_cpu)
    out = Path(training_args.output_dir)
    corpus = build_corpus(script_args, report_dir=out)
    recommendations = (NoveltyTask.build(corpus, script_args, [], script_args.train_splits).teacher_examples(PromptBuilder())
                       if script_args.recommend_share > 0 else [])
    recommendations = recommendation_mix(recommendations, len(corpus.profiled(*script_args.train_splits)),
                                         script_args.recommend_share, training_args.seed)
    train = sft_dataset(corpus, script_args.train_splits, recommendations)
    val = sft_dataset(corpus, ["val"]) if corpus.profiled("val") and training_args.eval_strategy != "no" else None

    tokenizer, model = build_model(model_args, training_args)
    stop = set_stop_token(model, tokenizer)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                         processing_class=tokenizer, peft_config=get_peft_config(model_args))
    result, resume = train_and_save(trainer, tokenizer, out, script_args.resume)

    metrics = {"train_users": len(train) - len(recommendations), "train_recommendations": len(recommendations), "val_users": len(val) if val is not None else 0,
               "teacher": corpus.teacher_name, "teacher_failures": len(corpus.failures()),
               "stop_token": stop, "resumed_from": Path(resume).name if resume else "none", **result.metrics}
    if val is not None:
        metrics.update(trainer.evaluate())
    metrics.update(held_out_metrics(trainer.model, tokenizer, corpus, script_args.eval_users,
                                    script_args.eval_max_new_tokens))
    metrics["wall_s"] = round(time.perf_counter() - start, 1)
    if trainer.is_world_process_zero():
        write_model_card(out, title="U-SCOPE profile student (SFT, LoRA)", base_model=model_args.model_name_or_path,
                         stage="sft", metrics=metrics,
                         configs={"script": asdict(script_args), "model": asdict(model_args), "training": training_args},
                         notes="Answers a structured usage-statistics prompt with chain-of-thought + a JSON user "
                               "profile (scope.profiles.schema.Profile). Load with scope.profiles.llms.load_student(base, [this folder]).")
    print(f"saved the adapter, tokenizer and model card to {out} ({metrics['wall_s']} s)")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_recipe(main, *parse_config((SFTScriptArguments, SFTConfig, ModelConfig), default_config=DEFAULT_CONFIG)))
