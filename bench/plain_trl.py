"""The plain trl scripts our SFT and reward-model stages are measured against: `trl.SFTTrainer` or
`trl.RewardTrainer` used directly on the benchmark's examples, nothing of this project imported. Run by
bench/train_vs_trl.py with the same trl as our stages; prints one JSON line: examples, tokens, seconds.

Usage (the benchmark calls it): .venv/bin/python bench/plain_trl.py '<json settings>'
"""

import json
import sys
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Trainer
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def common_args(settings: dict, output: str) -> dict:
    return dict(
        output_dir=output, max_length=settings["max_length"], learning_rate=settings["learning_rate"],
        per_device_train_batch_size=settings["batch_size"], max_steps=settings["steps"],
        logging_steps=settings["logging_steps"], eval_strategy="no", save_strategy="no", report_to="none",
        seed=settings["seed"],
        # trl turns both on by default; our stages run fp32 on the CPU without recomputing activations, and the
        # comparison is of the same arithmetic, not of defaults.
        bf16=False, gradient_checkpointing=False,
    )


def sft_trainer(settings: dict, tokenizer, output: str) -> SFTTrainer:
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    dataset = Dataset.from_list(read_jsonl(settings["train"]))
    return SFTTrainer(model=model, args=SFTConfig(assistant_only_loss=True, **common_args(settings, output)),
                      train_dataset=dataset, processing_class=tokenizer)


def reward_trainer(settings: dict, tokenizer, output: str) -> RewardTrainer:
    model = AutoModelForSequenceClassification.from_pretrained(settings["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    # The same pairs as our stage reads, in trl's conversational preference format.
    rows = [{"prompt": [{"role": "user", "content": row["prompt"]}],
             "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in read_jsonl(settings["train"])]
    return RewardTrainer(model=model, args=RewardConfig(**common_args(settings, output)),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def training_tokens(trainer: Trainer, stage: str) -> int:
    """Tokens of the tokenized training set: every one goes through the model once per epoch."""
    dataset = trainer.train_dataset
    if stage == "sft":
        return sum(len(ids) for ids in dataset["input_ids"])
    return sum(len(ids) for column in ("chosen_ids", "rejected_ids") for ids in dataset[column])


def main() -> None:
    settings = json.loads(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    tokenizer.pad_token = settings["pad_token"]
    build = sft_trainer if settings["stage"] == "sft" else reward_trainer
    with tempfile.TemporaryDirectory() as output:
        trainer = build(settings, tokenizer, output)
        result = trainer.train()
    print(json.dumps({"examples": len(trainer.train_dataset), "steps": result.global_step,
                      "tokens": training_tokens(trainer, settings["stage"]),
                      "seconds": result.metrics["train_runtime"]}))


if __name__ == "__main__":
    main()
