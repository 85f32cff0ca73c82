"""What the two trl-trained stages (SFT, reward model) share: trainer options, LoRA options and their
translation into `transformers.TrainingArguments` keywords."""

from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig

from common.modeling import choose_precision


@dataclass
class TrainerOptions:
    max_length: int = field(default=256, metadata={"help": "tokens per example"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (max_steps wins when > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: from num_train_epochs"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "examples per device per step"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "examples per device in eval"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps with linear warm-up"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    logging_steps: int = field(default=10, metadata={"help": "log train metrics every N steps"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: at the start/end only)"})
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "peft target modules"})
    merge: bool = field(default=True, metadata={"help": "merge the LoRA adapter into the saved model"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward "
                                                                          "pass: less memory, about 30% more compute"})
    precision: str = field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16 (auto: fp32 on CPU)"})
    seed: int = field(default=42, metadata={"help": "seed for data order, split and initialisation"})
    force: bool = field(default=False, metadata={"help": "retrain even if the output is up to date"})

    def lora_config(self, task_type: str) -> LoraConfig | None:
        if not self.use_lora:
            return None
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules, task_type=task_type)

    def trainer_kwargs(self, staging: str) -> dict[str, Any]:
        precision = choose_precision(self.precision)
        return dict(
            output_dir=staging,
            max_length=self.max_length,
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            warmup_steps=self.warmup_ratio,  # a float below 1 is a fraction of the total steps
            lr_scheduler_type=self.lr_scheduler_type,
            weight_decay=self.weight_decay,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            # trl turns this on by default; on a CPU or a model that fits, it only costs time.
            gradient_checkpointing=self.gradient_checkpointing,
            eval_strategy="steps" if self.eval_steps else "no",
            eval_steps=self.eval_steps or None,
            save_strategy="no",
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            seed=self.seed,
            data_seed=self.seed,
            report_to=["tensorboard"],
            dataloader_num_workers=0,
        )
