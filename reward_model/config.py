"""The reward model's options (`python -m reward_model --help` lists them) and what its output depends on: light
enough to find the output up to date before the training libraries load."""

from dataclasses import dataclass, field
from typing import Any

from common.checkpoint import describe_input, describe_parent
from common.options import TrainerOptions


@dataclass
class RewardStageConfig(TrainerOptions):
    model: str = field(default="runs/default/sft", metadata={"help": "initial model: the SFT checkpoint"})
    data: str = field(default="runs/default/prefs/ranked.jsonl", metadata={"help": "preference data: a file, or "
                                                                                      "several comma-separated"})
    eval_data: str = field(default="", metadata={"help": "held-out pairs; empty: hold out eval_fraction of prompts"})
    output_dir: str = field(default="runs/default/rm", metadata={"help": "where the checkpoint is written"})
    columns: str = field(default="", metadata={"help": "column mapping, e.g. chosen=good,rejected=bad"})
    min_margin: float = field(default=0.0, metadata={"help": "drop scored pairs whose scores differ by no more"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of prompts held out when no eval_data"})
    max_train_pairs: int = field(default=0, metadata={"help": "train on at most this many pairs (0: all)"})
    max_eval_pairs: int = field(default=500, metadata={"help": "evaluate on at most this many pairs (0: all)"})
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


def files(text: str) -> list[str]:
    """A data option's files: one path, or several comma-separated (iterated rounds train on every round's)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def stage_inputs(config: RewardStageConfig) -> dict[str, Any]:
    return {"model": describe_parent(config.model),
            **{key: [describe_input(source) for source in files(text)] if "," in text else describe_input(text)
               for key, text in (("data", config.data), ("eval_data", config.eval_data)) if text}}
