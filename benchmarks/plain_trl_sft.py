"""The minimal plain-TRL baseline of benchmarks/sft_overhead.py: a chat jsonl, SFTTrainer + LoRA, save.

    python benchmarks/plain_trl_sft.py DATA.jsonl MODEL_DIR OUT_DIR MAX_STEPS MAX_LENGTH THREADS
"""

import sys

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

if __name__ == "__main__":
    data, model_dir, out, steps, max_length, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=int(max_length),
                     completion_only_loss=True, per_device_train_batch_size=1, max_steps=int(steps), learning_rate=1e-3,
                     lr_scheduler_type="cosine", warmup_steps=3, logging_steps=5, save_strategy="no", report_to="none",
                     seed=42, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data, split="train"),
                         processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(out)
