"""What a PPO run writes: metrics per update, resumable checkpoints of the whole training state, and the
final policy and critic as plain transformers checkpoints."""

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch.utils.tensorboard import SummaryWriter

from common.checkpoint import RESUME
from common.modeling import load_causal_lm, load_reward_model
from ppo.config import PPOStageConfig
from ppo.core import KLController


class MetricsLog:
    """Metrics per update to TensorBoard and `metrics.jsonl` (main process only). On resume, log rows from
    updates after the checkpoint are dropped: those updates run again."""

    def __init__(self, folder: Path, active: bool, resume_update: int):
        self.active = active
        self.path = folder / "metrics.jsonl"
        if not active:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["update"] <= resume_update]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_update + 1)

    def log(self, update: int, metrics: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"update": update, **metrics}) + "\n")
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, update)
            elif key == "samples":
                table = "| prompt | reply | reward | judge |\n|---|---|---|---|\n" + "".join(
                    f"| {s['prompt']} | {s['reply']} | {s['reward']} | {s.get('judge', '')} |\n" for s in value)
                self.writer.add_text("samples", table, update)
        self.writer.flush()


class TrainingProgress:
    """What `accelerator.save_state` cannot see: the update counter and the KL controller."""

    def __init__(self, kl: KLController):
        self.update, self.kl = 0, kl

    def state_dict(self) -> dict:
        return {"update": self.update, "kl_coef": self.kl.coef}

    def load_state_dict(self, state: dict) -> None:
        self.update, self.kl.coef = state["update"], state["kl_coef"]


def resume_point(staging: Path, print_: str) -> Path | None:
    """The last complete checkpoint of an interrupted run with the same inputs, if there is one."""
    pointer = staging / RESUME / "latest.json"
    if not pointer.is_file():
        return None
    latest = json.loads(pointer.read_text())
    folder = staging / RESUME / latest["folder"]
    return folder if latest["fingerprint"] == print_ and folder.is_dir() else None


def save_checkpoint(accelerator: Accelerator, staging: Path, update: int, print_: str) -> None:
    """Model, optimizer, scheduler, RNG and progress into a new folder; then the pointer moves to it
    (atomically, by rename), then older folders go. A kill at any moment leaves a usable checkpoint."""
    folder = staging / RESUME / f"update-{update:06d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        temporary = staging / RESUME / "latest.json.tmp"
        temporary.write_text(json.dumps({"folder": folder.name, "fingerprint": print_, "update": update}))
        os.replace(temporary, staging / RESUME / "latest.json")
        for old in (staging / RESUME).glob("update-*"):
            if old != folder:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def whole_weights(accelerator: Accelerator, model: torch.nn.Module):
    """Under DeepSpeed ZeRO-3 each process holds a shard of the weights; sampling and the forward passes
    outside the engine (rollout scoring, evaluation) need them whole on every process for a while."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def save_final(accelerator: Accelerator, model, tokenizer, config: PPOStageConfig, staging: Path) -> None:
    """The policy at the folder's root and the critic in `value/`, each a plain transformers checkpoint
    (adapters merged unless merge: false). The full state dict is gathered first (ZeRO-3 shards it)."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    sources = {"policy": lambda: load_causal_lm(config.policy),
               "critic": lambda: load_reward_model(config.critic or config.reward_model, tokenizer.pad_token_id)}
    for name, folder in (("policy", staging), ("critic", staging / "value")):
        network = getattr(unwrapped, name)
        weights = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(f"{name}.")}
        if isinstance(network, PeftModel) and config.merge:
            network.load_state_dict(weights)
            # Merged into a base held in bf16, the adapter's small update would mostly round away: merge in fp32,
            # on the CPU, which has room for a large model's fp32 copy where the GPU may not.
            network.to("cpu", torch.float32).merge_and_unload().save_pretrained(folder)
        else:
            network.save_pretrained(folder, state_dict=frozen_blocks_back_in_fp32(network, weights, sources[name]))
        tokenizer.save_pretrained(folder)


def frozen_blocks_back_in_fp32(network: torch.nn.Module, weights: dict[str, torch.Tensor],
                               load_source: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The blocks below `trainable_layers` were held in the compute dtype and never changed: the checkpoint gets
    the fp32 weights they were loaded from, not their bf16 rounding (which would read as a change from SFT), and
    the network goes back to fp32 (on the CPU), whose dtype `save_pretrained` writes into config.json."""
    frozen = [key for key, tensor in network.state_dict(keep_vars=True).items()
              if not tensor.requires_grad and tensor.dtype != torch.float32 and key in weights]
    if not frozen:
        return weights
    source = load_source().state_dict()
    network.to("cpu", torch.float32)
    return {**weights, **{key: source[key] for key in frozen}}
