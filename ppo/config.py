"""PPO's options: one dataclass (`python -m ppo --help` lists them), what the output depends on, and the checks
that need no model: light enough to find the output up to date before the training libraries load."""

from dataclasses import dataclass, field
from typing import Any

from common.checkpoint import describe_input, describe_parent
from common.errors import PipelineError
from common.options import (
    PROMPT_LEARNING,
    AdapterOptions,
    RewardOptions,
    check_generation_backend,
    check_peft_method,
    generation_backend_option,
    precision_option,
)

# Why PPO takes no prompt-learning adapter (its reference could be the policy with the adapter off, but):
PPO_REFUSED = dict.fromkeys(PROMPT_LEARNING, "it puts virtual tokens in front of every sequence, and PPO's forwards "
                            "pass position ids and 4-D attention masks that peft does not extend over them")


@dataclass
class PPOStageConfig(AdapterOptions, RewardOptions):
    """peft_method (from AdapterOptions) is the policy's adapter; with one, the reference is the policy with its
    adapter disabled (one copy of the weights). The reward options (RewardOptions) are shared with RLOO."""

    # --- what goes in
    policy: str = field(default="runs/default/sft", metadata={"help": "initial policy: the SFT checkpoint (or an "
                                                                  "earlier round's PPO policy)"})
    reference: str = field(default="", metadata={"help": "KL reference; empty: the initial policy. Iterated rounds "
                                                         "keep it at the SFT model"})
    critic: str = field(default="", metadata={"help": "initial critic (a one-logit classifier); empty: the RM"})
    prompts: str = field(default="runs/default/data/prompts_ppo.jsonl", metadata={"help": "training prompt file"})
    prompt_column: str = field(default="prompt", metadata={"help": "column of the prompt file that holds prompts"})
    output_dir: str = field(default="runs/default/ppo", metadata={"help": "where the checkpoint is written"})
    judge: str = field(default="data.judges:gold_judge", metadata={"help": "judge logged in periodic evaluation "
                                                                            "(not a reward); empty: none"})
    # --- rollout
    num_updates: int = field(default=20, metadata={"help": "PPO updates (rollout + learning) in the whole run"})
    rollout_batch_size: int = field(default=32, metadata={"help": "episodes (prompts) per update, all processes"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate/forward call in the "
                                                                     "rollout (rollout micro-batching)"})
    max_prompt_length: int = field(default=128, metadata={"help": "longest templated prompt, in tokens; longer "
                                                                  "prompts are an error"})
    max_new_tokens: int = field(default=32, metadata={"help": "reply length limit"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; log-probs use logits / T"})
    generation_backend: str = generation_backend_option()
    # --- KL penalty
    kl_coef: float = field(default=0.05, metadata={"help": "initial per-token KL penalty coefficient"})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 (log ratio) or k3 (low-variance, non-negative)"})
    target_kl: float = field(default=0.0, metadata={"help": "adaptive KL: target sequence KL; 0: fixed kl_coef"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL horizon in episodes (Ziegler et al.)"})
    # --- learning
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    mini_batch_size: int = field(default=8, metadata={"help": "episodes per optimizer step, all processes"})
    micro_batch_size: int = field(default=4, metadata={"help": "episodes per forward/backward per process"})
    learning_rate: float = field(default=3e-6, metadata={"help": "policy learning rate (linear decay to 0)"})
    critic_learning_rate: float = field(default=0.0, metadata={"help": "critic learning rate; 0: learning_rate"})
    adam_eps: float = field(default=1e-5, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten per-token rewards before GAE"})
    trainable_layers: int = field(default=0, metadata={"help": "train only the top N blocks of policy and critic "
                                                                "(a cheap step on a CPU); 0: all"})
    critic_peft_method: str = field(default="none", metadata={"help": "adapter trained on the critic: none, lora, "
                                                                       "adalora or ia3"})
    ptx_coef: float = field(default=0.0, metadata={"help": "PPO-ptx: weight of an SFT loss on ptx_data; 0: off"})
    ptx_data: str = field(default="", metadata={"help": "SFT data for PPO-ptx (any shape `make sft` reads)"})
    # --- evaluation, checkpoints, run
    num_eval_prompts: int = field(default=16, metadata={"help": "prompts held out of training for periodic eval"})
    eval_every: int = field(default=5, metadata={"help": "evaluate every N updates (and before and after); "
                                                         "0: never"})
    save_every: int = field(default=5, metadata={"help": "checkpoint the training state every N updates; 0: never"})
    precision: str = precision_option()
    seed: int = field(default=42, metadata={"help": "seed for prompt order, sampling and initialisation"})
    force: bool = field(default=False, metadata={"help": "train again even if the output is up to date"})

    def optimizer_steps(self) -> int:
        """Steps of the whole run: the learning-rate schedule's (and AdaLoRA's) length."""
        return self.num_updates * self.ppo_epochs * (self.rollout_batch_size // self.mini_batch_size)


def stage_inputs(config: PPOStageConfig) -> dict[str, Any]:
    """What the output depends on besides the options: the parents' manifests and the data files' contents."""
    inputs = {"policy": describe_parent(config.policy), "reward_model": describe_parent(config.reward_model),
              "prompts": describe_input(config.prompts)}
    if config.critic:
        inputs["critic"] = describe_parent(config.critic)
    if config.reference:
        inputs["reference"] = describe_parent(config.reference)
    if config.ptx_data:
        inputs["ptx_data"] = describe_input(config.ptx_data)
    return inputs


def validate(config: PPOStageConfig) -> None:
    check_peft_method(config.peft_method, "ppo", PPO_REFUSED)
    check_peft_method(config.critic_peft_method, "ppo critic", PPO_REFUSED)
    if config.kl_estimator not in ("k1", "k3"):
        raise PipelineError(f"kl_estimator must be k1 or k3, got {config.kl_estimator!r}")
    if config.temperature <= 0:
        raise PipelineError(f"temperature must be above 0 (log-probs divide by it), got {config.temperature}")
    check_generation_backend(config.generation_backend)
    if config.ptx_coef and not config.ptx_data:
        raise PipelineError("ptx_coef > 0 needs ptx_data: the SFT data to keep fitting (e.g. the SFT train file)")
    if config.reference and config.uses_adapter():
        raise PipelineError("a separate reference and peft_method cannot be combined: with an adapter the reference "
                            "is the initial policy with its adapter off; pass peft_method none or no reference")
    config.check_one_way_to_train_fewer(config.trainable_layers, config.critic_peft_method)
