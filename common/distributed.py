"""Several processes (`accelerate launch`, `make <stage> NUM_PROCESSES=N`): what every stage does the same way.

A stage runs the same code in every process. The process group is joined first; only the main process
creates, writes and renames the output folder, the others wait for it at the points where they need it.
"""

import os
from pathlib import Path

import torch
from accelerate import PartialState

from common.checkpoint import StagedOutput
from common.errors import PipelineError


def start_processes() -> PartialState:
    """Join the process group (one process alone when not launched by accelerate/torchrun).

    Without GPUs accelerate needs two hints (accelerate 1.15): plain processes join one gloo group only when
    marked as CPU processes (unmarked, each trains alone on all the data), and DeepSpeed's processes must
    be given gloo by name (else each counts itself as process 0 of 1 and all of them write the output).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        return PartialState()
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() != "true":
        # Each process takes the GPU of its local rank: more processes than GPUs fail deep in CUDA otherwise.
        here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])), torch.cuda.device_count()
        if here > gpus:
            raise PipelineError(f"{here} processes on this machine but {gpus} GPU(s); launch at most {gpus} "
                                "(NUM_PROCESSES=), or run every process on the CPU with CUDA_VISIBLE_DEVICES=")
        return PartialState()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return PartialState(backend="gloo")
    os.environ["ACCELERATE_USE_CPU"] = "true"  # read again by the trainers' own AcceleratorState
    return PartialState(cpu=True)

def output_bytes(networks: list[torch.nn.Module], resumable: bool) -> int:
    """A stage's estimate of what it writes: the final weights (fp32, whatever a frozen base is held in), plus
    (when it checkpoints for resuming) two checkpoints of the weights as held and AdamW's two fp32 moments of the
    trained ones."""
    parameters = [p for network in networks for p in network.parameters()]
    weights = sum(p.numel() * p.element_size() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return 4 * sum(p.numel() for p in parameters) + (2 * (weights + 8 * trainable) if resumable else 0)


def open_output(output: StagedOutput, state: PartialState, keep: bool = False, need_bytes: int = 0) -> Path:
    """The staging folder, created (or kept for a resume) by the main process; every process gets its path.
    Every process checks the destination first, so a bad one stops them all rather than leaving the
    others waiting for a main process that has quit."""
    output.check(need_bytes)
    if state.is_main_process:
        output.open(keep=keep)
    state.wait_for_everyone()
    return output.staging
