"""What the two trl-trained stages (SFT, reward model) share: trainer options and their translation into
`transformers.TrainingArguments` keywords, resuming a killed run, stopping a diverged one, and saving the
trained model (whole, even when DeepSpeed ZeRO-3 or FSDP sharded it) per the checkpoint contract."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import PeftModel
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from common.adapters import AdapterOptions
from common.checkpoint import RESUME, StagedOutput
from common.distributed import open_output, output_bytes
from common.errors import PipelineError
from common.precision import Compute, precision_option


@dataclass
class TrainerOptions(AdapterOptions):
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
    save_steps: int = field(default=50, metadata={"help": "checkpoint the training state every N steps; a rerun "
                                                          "after a kill resumes from the last one; 0: never"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward "
                                                                          "pass: less memory, a third more compute"})
    precision: str = precision_option()
    seed: int = field(default=42, metadata={"help": "seed for data order, split and initialisation"})
    force: bool = field(default=False, metadata={"help": "retrain even if the output is up to date"})

    def trainer_kwargs(self, staging: Path, compute: Compute) -> dict[str, Any]:
        """`compute` is this process's device and resolved precision: fp32 weights, autocast in bf16/fp16."""
        return dict(
            output_dir=str(staging / RESUME),
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
            save_strategy="steps" if self.save_steps else "no",
            save_steps=self.save_steps or None,
            save_total_limit=2,  # the newest may be half-written when the run is killed; the one before is whole
            # transformers would drop NaN/inf losses from the logged mean; the divergence check must see them.
            logging_nan_inf_filter=False,
            bf16=compute.precision == "bf16",
            fp16=compute.precision == "fp16",
            use_cpu=compute.device.type == "cpu",  # without it the trainer refuses bf16 autocast on a CPU
            seed=self.seed,
            data_seed=self.seed,
            report_to=["tensorboard"],
            dataloader_num_workers=0,
            # The process group `start_processes` joined: the trainer would otherwise reset and rebuild it,
            # losing the gloo backend DeepSpeed needs on a CPU.
            accelerator_config={"use_configured_state": True},
        )


def open_for_training(output: StagedOutput, state: PartialState, print_: str, model: PreTrainedModel,
                      options: TrainerOptions) -> tuple[Path, str | None]:
    """The staging folder, and the trainer checkpoint to resume from when a killed run with the same inputs
    left one there (else the folder starts empty)."""
    folder = output.staging / RESUME
    stamp = folder / "fingerprint"
    resume = None
    if stamp.is_file() and stamp.read_text() == print_:
        # trainer_state.json is the last file the trainer writes into a checkpoint: its presence means whole.
        # The final step's checkpoint is no place to resume: the trainer would take one step too many.
        states = {c: json.loads((c / "trainer_state.json").read_text()) for c in folder.glob("checkpoint-*")
                  if (c / "trainer_state.json").is_file()}
        usable = [c for c, saved in states.items() if saved["global_step"] < saved["max_steps"]]
        resume = max(usable, key=lambda c: states[c]["global_step"], default=None)
    need = output_bytes([model], resumable=bool(options.save_steps))
    staging = open_output(output, state, keep=resume is not None, need_bytes=need)
    if state.is_main_process:
        folder.mkdir(exist_ok=True)
        stamp.write_text(print_)
        if resume is not None:
            drop_metrics_after(staging / "metrics.jsonl", states[resume])
    return staging, str(resume) if resume else None


def drop_metrics_after(path: Path, trainer_state: dict) -> None:
    """The steps after the resumed checkpoint run again and log again: their old rows go."""
    if path.is_file():
        step = trainer_state["global_step"]
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


class StopOnNonFinite(TrainerCallback):
    """Stop at the first non-finite logged loss or gradient norm, and never write a checkpoint of non-finite
    weights: the newest checkpoint in the partial folder stays the last good one."""

    def __init__(self, stage: str):
        self.stage = stage

    def stop(self, what: str, step: int, output_dir: str) -> None:
        raise PipelineError(f"{self.stage}: non-finite {what} at step {step}: training diverged; lower learning_rate "
                            f"or check the data; checkpoints (if any) in {output_dir} hold only earlier steps")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self.stop(f"{key} ({value})", state.global_step, args.output_dir)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None and not all(
                torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
            self.stop("weights", state.global_step, args.output_dir)


def save_trained_model(trainer: Trainer, staging: Path, options: TrainerOptions, initial: str,
                       load: Callable[[str], PreTrainedModel]) -> PreTrainedModel | None:
    """Write the trained model into `staging` and return it reloaded from there (main process; None on the
    others). The trainer's save gathers ZeRO-3/FSDP shards into one plain checkpoint; an adapter is merged
    into the `initial` weights unless the method or `merge: false` keeps it. Reloading proves the folder loads."""
    trainer.save_model(str(staging))
    # Training is over: models loaded from here on are whole, not built as ZeRO-3 shards (which would wait
    # for the other processes to load their share too).
    unset_hf_deepspeed_config()
    if not trainer.is_world_process_zero():
        return None
    (staging / "training_args.bin").unlink(missing_ok=True)
    if options.uses_adapter() and not options.keeps_adapter():
        base = load(initial)
        # The chat template may have added tokens: the base then grows as it did before training.
        if base.get_input_embeddings().num_embeddings != len(trainer.processing_class):
            base.resize_token_embeddings(len(trainer.processing_class))
        merged = PeftModel.from_pretrained(base, str(staging)).merge_and_unload()
        for adapter_file in staging.glob("adapter_*"):
            adapter_file.unlink()
        merged.save_pretrained(staging)
    return load(str(staging)).to(trainer.args.device)
