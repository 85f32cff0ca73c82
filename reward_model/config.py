"""The reward model's options (`python -m reward_model --help` lists them) and what its output depends on: light
enough to find the output up to date before the training libraries load."""

from dataclasses import dataclass, field
from typing import Any

from common.checkpoint import describe_parent
from common.options import PreferenceDataOptions, TrainerOptions


@dataclass
class RewardStageConfig(TrainerOptions, PreferenceDataOptions):
    model: str = field(default="runs/default/sft", metadata={"help": "initial model: the SFT checkpoint"})
    output_dir: str = field(default="runs/default/rm", metadata={"help": "where the checkpoint is written"})
    max_length: int = field(default=256, metadata={"help": "tokens of prompt and reply; longer pairs are dropped"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "prompts (each with all its compared "
                                                                         "replies) per device per step"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "sequences per forward pass in eval"})
    use_margin: bool = field(default=False, metadata={"help": "loss -log sigmoid(r_c - r_r - margin) with the "
                                                               "data's score margins (Llama 2)"})
    center_rewards_coefficient: float = field(default=0.0, metadata={"help": "weight of mean(r^2) that keeps "
                                                                              "rewards centred at 0; 0: off"})
    head_learning_rate: float = field(default=0.0, metadata={"help": "learning rate of the new score head; "
                                                                      "0: learning_rate"})
    trainable_layers: int = field(default=0, metadata={"help": "train only the top N transformer blocks (plus "
                                                                "final norm and score head); 0: all"})
    norm_responses: int = field(default=512, metadata={"help": "training replies scored for the reward "
                                                                "mean/std that PPO normalises with"})


def stage_inputs(config: RewardStageConfig) -> dict[str, Any]:
    return {"model": describe_parent(config.model), **config.data_inputs()}
