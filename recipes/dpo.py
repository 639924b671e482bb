"""DPO alignment of the SFT student (U-SCOPE, Eq. 27).

    accelerate launch recipes/dpo.py                      # CPU default: recipes/configs/dpo_cpu.yaml

Preference triplets (x_u, y_w = grounded profile, y_l = popularity profile / another user's
profile / a failing student sample, see scope.profiles.dpo). The SFT adapter is merged into the base
weights and a new LoRA is trained with TRL's DPOTrainer: with no ``ref_model`` the reference is
the adapter-disabled model, i.e. the SFT student. With ``load_in_4bit`` (QLoRA) the SFT adapter is
merged into the unquantized base and the merged weights are quantized to NF4 once
(``scope.profiles.llms.load_student``); the reference is then that quantized SFT student. Reports
reward accuracy / margins (train and held-out pairs) and the grounding score of the aligned
student; saves adapter, tokenizer and a model card; resumes from its last checkpoint.
"""

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from trl import DPOConfig, DPOTrainer, ModelConfig, get_peft_config

from scope.cli import parse_config, run_recipe, use_threads
from scope.profiles.corpus import ProfileDataArguments, build_corpus
from scope.profiles.dpo import preference_dataset, recommendation_pairs
from scope.profiles.evaluation import generate, generate_answers, held_out_metrics
from scope.profiles.llms import LOADER_KEYS, LORA_KEYS, generation_model, load_model_tokenizer, load_student
from scope.profiles.novelty import NoveltyTask
from scope.profiles.prompts import PromptBuilder
from scope.profiles.sft import set_stop_token, train_and_save, write_model_card

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "dpo_cpu.yaml"
log = logging.getLogger("recipes.dpo")
# The trl.ModelConfig keys this recipe honours: the loader's (scope.profiles.llms.load_student) and the LoRA's.
MODEL_KEYS = LOADER_KEYS + LORA_KEYS


@dataclass
class DPOScriptArguments(ProfileDataArguments):
    sft_adapter: str = "runs/uscope/sft"          # the SFT student's LoRA folder (recipes/sft.py output_dir)
    negatives: list[str] = field(default_factory=lambda: ["popularity", "other_user"])  # + "student"
    student_negative_users: int = 0               # with "student": sample the SFT student on this many train users
    student_max_new_tokens: int = 512
    student_negative_cases: int = 0               # with "student_recommendation": sample the SFT student on this many
    student_temperature: float = 1.0              # ... training cases of the novelty task (on-policy negatives)
    student_samples: int = 1                      # answers sampled per case: pairs rank them (scope.profiles.dpo)
    generation_batch_size: int = 8
    inference_dtype: str = "float32"              # float32 | bfloat16: weights in bf16, attention in fp32 (scope.profiles.llms.generation_model)
    max_grounding: float = 0.67                   # a student sample below this grounding@3 is a negative
    eval_pairs: int = 4                           # held-out (val) pairs scored after training; 0 = skip
    eval_users: int = 2
    eval_max_new_tokens: int = 512
    resume: bool = True
    threads: int = 0

    def __post_init__(self):
        if self.student_samples < 1:
            raise ValueError(f"student_samples must be >= 1 (answers sampled per case), got {self.student_samples}")


def build_student(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: ModelConfig):
    """The tokenizer and the SFT student the trainer gets: the base of ``model_args`` with the SFT adapter
    merged (every ModelConfig key of the loader applied). With ``load_in_4bit`` / ``load_in_8bit`` the adapter
    is merged into the unquantized weights and the merged weights are quantized (QLoRA on the SFT student)."""
    return (load_model_tokenizer(model_args, training_args),
            load_student(model_args, [script_args.sft_adapter], training_args=training_args))


def _mean(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return sum(values) / len(values) if values else None


def main(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: ModelConfig) -> dict:
    start = time.perf_counter()
    use_threads(script_args.threads, training_args.use_cpu)
    out = Path(training_args.output_dir)
    corpus = build_corpus(script_args, report_dir=out)
    tokenizer, model = build_student(script_args, training_args, model_args)
    set_stop_token(model, tokenizer)
    sampler = generation_model(model, script_args.inference_dtype, copy_weights=True)   # the policy trains on in fp32

    student_answers = None
    if "student" in script_args.negatives and script_args.student_negative_users > 0:
        users = corpus.profiled(*script_args.train_splits)[: script_args.student_negative_users]
        answers = generate_answers(sampler, tokenizer, [corpus.prompts[u] for u in users],
                                   max_new_tokens=script_args.student_max_new_tokens)
        student_answers = dict(zip(users, answers))
    recommendation_rows = []
    if "student_recommendation" in script_args.negatives and script_args.student_negative_cases > 0:
        task, builder = NoveltyTask.build(corpus, script_args, [], script_args.train_splits), PromptBuilder()
        rng = np.random.default_rng(training_args.seed)
        picked = sorted(rng.permutation(len(task.train_cases))[: script_args.student_negative_cases])
        cases = [task.train_cases[i] for i in picked]
        n = script_args.student_samples
        samples = generate(sampler, tokenizer, task.prompts(builder, cases), max_new_tokens=script_args.recommend_max_new_tokens,
                           batch_size=script_args.generation_batch_size, temperature=script_args.student_temperature,
                           seed=training_args.seed, samples=n)
        answers = {c.key: [g.text for g in samples[i * n:(i + 1) * n]] for i, c in enumerate(cases)}
        recommendation_rows = recommendation_pairs(task, builder, answers)
        log.info("on-policy recommendation pairs: %d of %d cases (%d samples each)", len(recommendation_rows), len(cases), n)
    del sampler
    train = preference_dataset(corpus, script_args.train_splits, [k for k in script_args.negatives if k != "student_recommendation"],
                               student_answers=student_answers, max_grounding=script_args.max_grounding,
                               seed=training_args.seed, recommendation_rows=recommendation_rows)
    fixed_kinds = [k for k in script_args.negatives if not k.startswith("student")]   # held-out pairs need no sampling
    held_out = (preference_dataset(corpus, ["val"], fixed_kinds, seed=training_args.seed)
                if corpus.profiled("val") and script_args.eval_pairs and fixed_kinds else None)
    if held_out is not None:
        held_out = held_out.shuffle(seed=training_args.seed).select(range(min(script_args.eval_pairs, len(held_out))))

    model.train()
    trainer = DPOTrainer(model=model, ref_model=None, args=training_args, train_dataset=train,
                         eval_dataset=held_out, processing_class=tokenizer, peft_config=get_peft_config(model_args))
    result, resume = train_and_save(trainer, tokenizer, out, script_args.resume)

    history = trainer.state.log_history
    metrics = {"pairs": len(train), "pairs_by_kind": dict(zip(*_kinds(train))), "beta": training_args.beta,
               "train_reward_accuracy": _mean(history, "rewards/accuracies"),
               "train_reward_margin": _mean(history, "rewards/margins"),
               "resumed_from": Path(resume).name if resume else "none", **result.metrics}
    if held_out is not None:
        ev = trainer.evaluate()
        metrics.update({"heldout_pairs": len(held_out), "heldout_reward_accuracy": ev.get("eval_rewards/accuracies"),
                        "heldout_reward_margin": ev.get("eval_rewards/margins"), "heldout_loss": ev.get("eval_loss")})
    metrics.update(held_out_metrics(trainer.model, tokenizer, corpus, script_args.eval_users,
                                    script_args.eval_max_new_tokens))
    metrics["wall_s"] = round(time.perf_counter() - start, 1)
    if trainer.is_world_process_zero():
        write_model_card(out, title="U-SCOPE profile student (DPO, LoRA on the merged SFT student)",
                         base_model=model_args.model_name_or_path, stage="dpo", metrics=metrics,
                         configs={"script": asdict(script_args), "model": asdict(model_args), "training": training_args},
                         notes=f"Apply after the SFT adapter: scope.profiles.llms.load_student(base, ['{script_args.sft_adapter}', "
                               f"'{out}']). Reference policy = adapter disabled = the SFT student.")
    print(f"DPO: reward accuracy {metrics['train_reward_accuracy']}, margin {metrics['train_reward_margin']}; saved to {out}")
    return metrics


def _kinds(dataset) -> tuple[list[str], list[int]]:
    kinds = sorted(set(dataset["kind"]))
    return kinds, [dataset["kind"].count(k) for k in kinds]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_recipe(main, *parse_config((DPOScriptArguments, DPOConfig, ModelConfig), default_config=DEFAULT_CONFIG)))
