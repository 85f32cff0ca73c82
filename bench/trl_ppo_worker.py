"""One run of trl 1.12's `trl.experimental.ppo.PPOTrainer`, executed by `bench/ppo_vs_trl.py` inside the
throwaway venv that holds trl 1.12. Prints one JSON line: episodes, seconds in `train()` and, on a GPU, the peak
allocated GPU memory in GiB.

Usage (the benchmark calls it): bench/.venv-trl112/bin/python bench/trl_ppo_worker.py '<json settings>'
"""

import json
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer


def main() -> None:
    settings = json.loads(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(settings["policy"], padding_side="left")
    tokenizer.pad_token = settings["pad_token"]
    policy = AutoModelForCausalLM.from_pretrained(settings["policy"])
    reference = None if settings["lora"] else AutoModelForCausalLM.from_pretrained(settings["policy"])
    value = AutoModelForSequenceClassification.from_pretrained(settings["reward_model"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(settings["reward_model"], num_labels=1)
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({"input_ids": settings["prompt_ids"]})
    with tempfile.TemporaryDirectory() as output:
        config = PPOConfig(
            output_dir=output,
            per_device_train_batch_size=settings["micro_batch_size"],
            gradient_accumulation_steps=settings["rollout_batch_size"] // settings["micro_batch_size"],
            num_mini_batches=settings["rollout_batch_size"] // settings["mini_batch_size"],
            local_rollout_forward_batch_size=settings["generation_batch_size"],
            total_episodes=settings["episodes"],
            num_ppo_epochs=settings["ppo_epochs"],
            response_length=settings["max_new_tokens"],
            temperature=settings["temperature"],
            learning_rate=settings["learning_rate"],
            kl_coef=settings["kl_coef"],
            missing_eos_penalty=settings["missing_eos_penalty"],
            stop_token="eos",
            gradient_checkpointing=settings["gradient_checkpointing"],
            num_sample_generations=0,
            save_strategy="no",
            report_to=[],
            bf16=settings["precision"] == "bf16",
            seed=settings["seed"],
        )
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM") if settings["lora"] else None
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward, train_dataset=dataset, value_model=value, peft_config=peft_config)
        started = time.time()
        trainer.train()
        seconds = time.time() - started
    result = {"episodes": settings["episodes"], "seconds": seconds}
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(json.dumps(result))


if __name__ == "__main__":
    main()
