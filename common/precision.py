"""Where every model runs and in which number format: one device helper and one precision policy for all stages.

The policy (README, "Precision"): trained weights and optimizer state are fp32; forward and backward passes run
under autocast in the compute dtype (bf16 on a GPU that has it). Models that only run forward (reward models and
judges, the models of `make prefs`, `make eval` and `make score`) and the frozen weights of a trained one (the base
under an adapter, the blocks below `trainable_layers`, in every stage) are stored in the compute dtype: half the
memory, the same matmuls. The one exception is a reference (PPO's, DPO's, RLOO's), stored parameter by parameter
like the policy it is compared with, so that identical weights give identical log-probs, bit for bit, and the KL
penalty starts at exactly 0. Log-softmax, values, rewards and losses are fp32.
"""

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from accelerate import PartialState

from common.errors import PipelineError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_device() -> torch.device:
    """The device of this process: its GPU when there is one (the process's own under a multi-process launch),
    else the CPU. The same answer accelerate and the trainers use."""
    return PartialState().device


def cpu_multiplies_bf16_fast() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AMX tiles (Intel Xeon since Sapphire Rapids) or AVX512-BF16
    (AMD EPYC since Zen 4, Intel Cooper Lake). There bf16 autocast runs the embedded default's forward passes 2-3x
    faster than fp32 (AMX; a 2-core AMD EPYC: forward 2.6x, forward and backward 2.8x). Without either, bf16
    autocast on a CPU is slower than fp32 (8x on an AVX2 CPU)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def choose_precision(requested: str, device: torch.device) -> str:
    """`auto` picks bf16 on a GPU that supports it, fp16 on other GPUs, bf16 on a CPU with bf16 instructions (AMX,
    AVX512-BF16) and fp32 on other CPUs. bf16 may be asked for on any CPU: torch runs bf16 autocast there, which is
    how the tests check the GPU's numerics."""
    if requested not in ("auto", *DTYPES):
        raise PipelineError(f"precision must be auto, fp32, bf16 or fp16, got {requested!r}")
    gpu = device.type == "cuda"
    if requested == "fp16" and not gpu:
        raise PipelineError("precision fp16 needs a GPU; use precision: auto, fp32 or bf16 on the CPU")
    if requested != "auto":
        return requested
    if not gpu:
        return "bf16" if cpu_multiplies_bf16_fast() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass(frozen=True)
class Compute:
    """A device and a precision: what every forward pass, sampling included, runs under."""

    device: torch.device
    precision: str

    @classmethod
    def choose(cls, requested: str) -> "Compute":
        device = compute_device()
        return cls(device, choose_precision(requested, device))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, which models that only run forward are stored in."""
        return DTYPES[self.precision]

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32")
