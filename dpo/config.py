"""DPO's options (`python -m dpo --help` lists them) and what its output depends on: light enough to find the
output up to date before the training libraries load."""

from dataclasses import dataclass, field
from typing import Any

from common.checkpoint import describe_parent
from common.errors import PipelineError
from common.options import POLICY_REFUSED, PreferenceDataOptions, TrainerOptions, check_peft_method

# trl's DPO losses; several comma-separated are summed (with loss_weights), e.g. sigmoid,sft (RPO).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOStageConfig(TrainerOptions, PreferenceDataOptions):
    model: str = field(default="runs/default/sft", metadata={"help": "initial policy and frozen reference: the "
                                                                      "SFT checkpoint"})
    output_dir: str = field(default="runs/default/dpo", metadata={"help": "where the checkpoint is written"})
    max_length: int = field(default=256, metadata={"help": "tokens of prompt and reply; longer replies are cut"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, hinge, robust, ... (trl's "
                                                                "names; comma-separated ones are summed)"})
    loss_weights: str = field(default="", metadata={"help": "weights of those losses, comma-separated; empty: 1"})
    beta: float = field(default=0.1, metadata={"help": "strength of the pull to the reference (IPO: its tau)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "robust DPO: assumed share of flipped labels"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate"})
    trainable_layers: int = field(default=0, metadata={"help": "train only the top N transformer blocks; 0: all"})

    def losses(self) -> list[str]:
        return [name.strip() for name in self.loss_type.split(",") if name.strip()]

    def weights(self) -> list[float] | None:
        if not self.loss_weights:
            return None
        try:
            weights = [float(w) for w in self.loss_weights.split(",")]
        except ValueError:
            raise PipelineError(f"loss_weights must be numbers separated by commas, got {self.loss_weights!r}"
                                ) from None
        if len(weights) != len(self.losses()):
            raise PipelineError(f"loss_weights has {len(weights)} weight(s) for {len(self.losses())} loss type(s)")
        return weights


def stage_inputs(config: DPOStageConfig) -> dict[str, Any]:
    return {"model": describe_parent(config.model), **config.data_inputs()}


def validate(config: DPOStageConfig) -> None:
    unknown = [name for name in config.losses() if name not in LOSS_TYPES]
    if unknown or not config.losses():
        raise PipelineError(f"loss_type {config.loss_type!r}: use one or more of {', '.join(LOSS_TYPES)}")
    config.weights()
    check_peft_method(config.peft_method, "dpo", POLICY_REFUSED)
    config.check_one_way_to_train_fewer(config.trainable_layers)
    if config.beta <= 0:
        raise PipelineError(f"beta must be above 0, got {config.beta}")
