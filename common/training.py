"""What the trl-trained stages (SFT, reward model, DPO, RLOO) share: trainer options and their translation into
`transformers.TrainingArguments` keywords, the precision policy's dtypes, resuming a killed run, stopping a diverged
one, and saving the trained model (whole, even when DeepSpeed ZeRO-3 or FSDP sharded it) per the checkpoint
contract."""

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from common.checkpoint import RESUME, StagedOutput
from common.distributed import open_output, output_bytes
from common.errors import PipelineError
from common.modeling import in_policy_dtypes, stored_like
from common.options import TrainerOptions
from common.precision import Compute


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


def frozen_in_compute_dtype(trainer: Trainer, compute: Compute, stage: str) -> None:
    """The precision policy on a built trainer, before it trains: what it trains stays fp32, what it only runs
    forward (an adapter's base, the blocks below `trainable_layers`) goes to the compute dtype (half the memory in
    bf16, and no re-cast by autocast at every forward), and a reference the trainer holds is laid out like the
    policy. DeepSpeed and FSDP flatten parameters into shards of one dtype (ZeRO-3 fails on a mix): there all stay
    fp32, and their engines keep the compute-dtype copies."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return
    in_policy_dtypes(trainer.model, compute.dtype)
    if getattr(trainer, "ref_model", None) is not None:
        stored_like(trainer.ref_model, trainer.model)
    frozen = sum(p.numel() for p in trainer.model.parameters() if not p.requires_grad)
    if frozen and compute.dtype != torch.float32:
        PartialState().print(f"{stage}: {frozen:,} frozen parameters held in {compute.precision}, the trained ones "
                             "in fp32")


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
    into the `initial` weights unless the method or `merge: false` keeps it; blocks held in the compute dtype below
    `trainable_layers` never changed, and get back the fp32 weights they came from (not their bf16 rounding, which
    would read as a change). Reloading proves the folder loads."""
    frozen = [name for name, parameter in trainer.model.named_parameters()
              if not parameter.requires_grad and parameter.dtype != torch.float32]
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
    elif frozen and not options.uses_adapter():
        saved, source = load(str(staging)), load(initial).state_dict()
        saved.load_state_dict({**saved.state_dict(), **{name: source[name] for name in frozen}})
        saved.save_pretrained(staging)
    return load(str(staging)).to(trainer.args.device)
