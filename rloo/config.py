"""RLOO's options (`python -m rloo --help` lists them) and what its output depends on: light enough to find the
output up to date before the training libraries load."""

from dataclasses import dataclass, field
from typing import Any

from common.checkpoint import describe_input, describe_parent
from common.errors import PipelineError
from common.options import POLICY_REFUSED, RewardOptions, TrainerOptions, check_peft_method


@dataclass
class RLOOStageConfig(TrainerOptions, RewardOptions):
    """The reward options (RewardOptions) are PPO's: the same sources, weights, clip and missing-EOS penalty."""

    policy: str = field(default="runs/default/sft", metadata={"help": "initial policy and KL reference: the SFT "
                                                                      "checkpoint"})
    prompts: str = field(default="runs/default/data/prompts_ppo.jsonl", metadata={"help": "training prompt file"})
    prompt_column: str = field(default="prompt", metadata={"help": "column of the prompt file that holds prompts"})
    output_dir: str = field(default="runs/default/rloo", metadata={"help": "where the checkpoint is written"})
    num_generations: int = field(default=4, metadata={"help": "replies sampled per prompt; each reply's baseline "
                                                              "is the mean reward of the others"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "replies per device per micro-batch (a "
                                                                           "multiple of num_generations)"})
    max_prompt_length: int = field(default=128, metadata={"help": "longest templated prompt, in tokens; longer "
                                                                  "prompts are an error"})
    max_new_tokens: int = field(default=32, metadata={"help": "reply length limit"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty per nat of a reply's summed log-ratio to the "
                                                           "reference, taken off its reward (PPO's kl_coef)"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer passes over each batch of replies; above 1 "
                                                             "the policy ratio is clipped as in PPO"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip when num_iterations > 1"})
    learning_rate: float = field(default=3e-6, metadata={"help": "peak learning rate"})
    trainable_layers: int = field(default=0, metadata={"help": "train only the top N transformer blocks; 0: all"})


def stage_inputs(config: RLOOStageConfig) -> dict[str, Any]:
    return {"policy": describe_parent(config.policy), "reward_model": describe_parent(config.reward_model),
            "prompts": describe_input(config.prompts)}


def validate(config: RLOOStageConfig) -> None:
    check_peft_method(config.peft_method, "rloo", POLICY_REFUSED)
    config.check_one_way_to_train_fewer(config.trainable_layers)
    if config.num_generations < 2:
        raise PipelineError(f"num_generations must be at least 2 (a reply's baseline is the others' mean reward), "
                            f"got {config.num_generations}")
    if config.per_device_train_batch_size % config.num_generations:
        raise PipelineError(f"per_device_train_batch_size {config.per_device_train_batch_size} must be a multiple of "
                            f"num_generations {config.num_generations}: a prompt's replies share one batch")
    if config.temperature <= 0:
        raise PipelineError(f"temperature must be above 0 (replies are sampled), got {config.temperature}")
    if config.eval_steps:
        raise PipelineError("rloo has no periodic evaluation (eval_steps must be 0): `make eval` compares the "
                            "finished policies on held-out prompts")
