"""Stage 3: PPO against the reward model (InstructGPT's third step), our own trainer on `accelerate`.

Usage:
    python -m ppo --config configs/default.yaml                                  # embedded default
    python -m ppo --config configs/default.yaml --prompts my_prompts.jsonl --output_dir runs/mine/ppo
    python -m ppo --config configs/default.yaml --extra_rewards "data.judges:gold_judge=0.5"
    python -m ppo --config configs/default.yaml --use_lora true                  # reference = adapter off
    make ppo NUM_PROCESSES=2                                                     # 2 processes (DDP)
    make ppo ACCELERATE_CONFIG=configs/accelerate/zero3.yaml NUM_PROCESSES=8     # DeepSpeed ZeRO-3
    make ppo                   # after make rm;  make ppo PROMPTS=my_prompts.jsonl for your own prompts

One update, as in Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"):
  1. rollout: sample a reply to each prompt of the batch from the policy (left-padded prompts, KV cache,
     temperature T), cut it after its first EOS, and record the policy's and the reference's log-probs of
     logits / T and the critic's value of every reply token;
  2. reward: the reward sources (the RM, plus optional RMs or `module:function` callables, weighted) score
     each reply once; that score lands on the reply's last real token, and every token pays the KL
     penalty kl_coef * (log pi - log pi_ref);
  3. advantages: GAE over the reply tokens, whitened over the batch;
  4. learn: `ppo_epochs` passes over the batch in minibatches; clipped policy loss plus vf_coef times the
     clipped value loss (plus an SFT loss on SFT data with PPO-ptx); one optimizer step per minibatch.

Writes `output_dir` per the checkpoint contract: the policy (merged, or a LoRA adapter with merge: false),
the critic in `value/`, `metrics.jsonl`, TensorBoard logs and `pipeline.json`. Checkpoints of the whole
training state go to `.ppo.partial/resume/` every `save_every` updates; a rerun after a kill resumes there.
"""

import contextlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler, set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from common.checkpoint import (
    RESUME,
    StagedOutput,
    describe_input,
    describe_parent,
    fingerprint,
    require_checkpoint,
    up_to_date,
)
from common.config import parse_config, parse_mapping
from common.distributed import open_output, output_bytes, start_processes
from common.errors import PipelineError
from common.modeling import (
    FiniteLogitsGuard,
    freeze_lower_blocks,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    pad_sequences,
)
from common.precision import Compute, choose_precision
from common.reward import RewardScorer, prompt_input_ids
from data.chat import load_chat_examples
from data.judges import Judge, load_judge, run_judge
from data.prompts import load_prompts


@dataclass
class PPOStageConfig:
    # --- what goes in
    policy: str = field(default="runs/default/sft", metadata={"help": "initial policy and reference: SFT checkpoint"})
    reward_model: str = field(default="runs/default/rm", metadata={"help": "reward model checkpoint"})
    critic: str = field(default="", metadata={"help": "initial critic (a one-logit classifier); empty: the RM"})
    prompts: str = field(default="runs/default/data/prompts_ppo.jsonl", metadata={"help": "training prompt file"})
    prompt_column: str = field(default="prompt", metadata={"help": "column of the prompt file that holds prompts"})
    output_dir: str = field(default="runs/default/ppo", metadata={"help": "where the checkpoint is written"})
    # --- reward
    reward_model_weight: float = field(default=1.0, metadata={"help": "weight of the reward model's score"})
    extra_rewards: str = field(default="", metadata={"help": "more reward sources, 'spec=weight,...': a spec is an "
                                                              "RM folder or module:function; each is logged"})
    normalize_reward: bool = field(default=True, metadata={"help": "whiten RM scores with the mean/std the RM "
                                                                   "stage stored in its pipeline.json"})
    reward_clip: float = field(default=5.0, metadata={"help": "clip the summed score to [-c, c]; 0: off"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the score of a reply cut "
                                                                      "off at max_new_tokens (no EOS)"})
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
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter on the policy; the reference is "
                                                            "the policy with the adapter disabled"})
    critic_use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter on the critic too"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "peft target modules"})
    merge: bool = field(default=True, metadata={"help": "merge LoRA adapters into the saved models"})
    ptx_coef: float = field(default=0.0, metadata={"help": "PPO-ptx: weight of an SFT loss on ptx_data; 0: off"})
    ptx_data: str = field(default="", metadata={"help": "SFT data for PPO-ptx (any shape `make sft` reads)"})
    # --- evaluation, checkpoints, run
    num_eval_prompts: int = field(default=16, metadata={"help": "prompts held out of training for periodic eval"})
    eval_every: int = field(default=5, metadata={"help": "evaluate every N updates (and before and after); "
                                                         "0: never"})
    save_every: int = field(default=5, metadata={"help": "checkpoint the training state every N updates; 0: never"})
    precision: str = field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16 (auto: bf16 on a GPU that "
                                                             "has it, fp32 on the CPU)"})
    seed: int = field(default=42, metadata={"help": "seed for prompt order, sampling and initialisation"})
    force: bool = field(default=False, metadata={"help": "train again even if the output is up to date"})


# ----------------------------------------------------------------------------------------------------------
# The maths: pure functions on [episodes, reply tokens] tensors; `mask` is 1 on real reply tokens.


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  total: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> torch.Tensor:
    """Zero mean (unless shift_mean is False), unit variance over the real tokens; padding stays 0. `total`
    sums the statistics over processes, so each process whitens with the whole batch's mean and variance,
    as a single process holding the whole batch would."""
    count, first = total(torch.stack([mask.sum(), (values * mask).sum()]))
    mean = first / count.clamp(min=1)
    second = total(((values - mean) ** 2 * mask).sum())
    variance = second / (count - 1).clamp(min=1)  # unbiased
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of `tokens` under logits / T (the distribution they were sampled from). fp32 before dividing:
    every caller (policy, reference, learning) then rounds the same way, whatever dtype the logits came in."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both from one log-softmax over the vocabulary (the rollout logs entropy; learning needs none)."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimates from samples of pi (Schulman, "Approximating KL divergence"):
    k1 = log(pi/pi_ref), unbiased but can be negative; k3 = (r - 1) - log r with r = pi_ref/pi, unbiased,
    never negative and of lower variance."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Every reply token pays the KL penalty; the reply's score lands on its last real token (its EOS, or
    the last token before the length limit)."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(dim=1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) backwards over the reply tokens; the value after the last token is 0.
    Returns (advantages, returns = advantages + values)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def ppo_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange: float, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The clipped surrogate policy loss and the clipped value loss, averaged over real tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
    # The value may move at most cliprange_value from the value it had when the rollout was taken.
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    value_errors = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_errors, mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask).item(),
            "policy/ratio_mean": masked_mean(ratio, mask).item(),
            "value/clipfrac": masked_mean(((values_clipped - returns) ** 2 > (values - returns) ** 2).float(),
                                          mask).item(),
        }
    return policy_loss, value_loss, stats


class KLController:
    """A fixed coefficient, or Ziegler et al.'s adaptive one: nudged towards `target` sequence KL, by at
    most 20% per horizon of episodes."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, sequence_kl: float, episodes: int) -> None:
        if self.target:
            error = min(max(sequence_kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * episodes / self.horizon


# ----------------------------------------------------------------------------------------------------------
# Models


def attention_without_empty_rows(model: PreTrainedModel, mask: torch.Tensor) -> torch.Tensor:
    """The causal attention of a padded batch in which every padding position attends to itself.

    With left padding a padding position has no key to attend to: a query row with every key masked. cuDNN's
    attention (torch 2.11's default on H100) fills masked scores with -65504, so such a row's log-sum-exp is
    about -65000, and its bf16 backward is reported to return NaN query gradients there, which the optimizer
    writes into the weights (the next rollout then samples from NaN logits): our reading of why bf16 PPO broke
    on the GPU. Real tokens see exactly what the 2-D mask gives them; padding rows get one key (themselves)
    and a finite result nobody reads. Flash attention takes the 2-D mask (it drops padding itself); eager
    attention adds a float mask."""
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        return mask
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    itself = torch.eye(width, dtype=torch.bool, device=mask.device)
    allowed = causal & (mask.bool()[:, None, None, :] | itself)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, device=mask.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def reply_logits(policy: PreTrainedModel, input_ids, attention_mask, position_ids, reply_width: int) -> torch.Tensor:
    """Logits at the positions that predict the reply's tokens (the one before each; the reply fills the
    last `reply_width` columns). `logits_to_keep` skips the LM head over the prompt: with a 49k-token
    vocabulary that head is a large share of a small model's compute."""
    return policy(input_ids=input_ids, attention_mask=attention_without_empty_rows(policy, attention_mask),
                  position_ids=position_ids, use_cache=False, logits_to_keep=reply_width + 1).logits[:, :-1]


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic as one module with one optimizer: what `accelerate` (DDP, DeepSpeed) prepares as a
    unit. A forward pass returns the policy's logits and the critic's values at the positions that predict
    the reply's tokens and, for PPO-ptx, the policy's logits on an SFT batch."""

    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, position_ids, reply_width: int, ptx_ids=None, ptx_mask=None):
        logits = reply_logits(self.policy, input_ids, attention_mask, position_ids, reply_width)
        # The critic is a sequence classifier; its score head applied to each position's hidden state
        # gives a value per token (the classifier itself only reads the last one).
        critic = self.critic.get_base_model() if isinstance(self.critic, PeftModel) else self.critic
        hidden = getattr(critic, critic.base_model_prefix)(
            input_ids=input_ids, attention_mask=attention_without_empty_rows(critic, attention_mask),
            position_ids=position_ids, use_cache=False)
        values = critic.score(hidden.last_hidden_state[:, -reply_width - 1:-1]).squeeze(-1).float()
        ptx_logits = None
        if ptx_ids is not None:
            ptx_logits = self.policy(input_ids=ptx_ids, attention_mask=ptx_mask, use_cache=False).logits
        return logits, values, ptx_logits


def disable_dropout(model: torch.nn.Module) -> None:
    # Dropout makes the log-probs of the same tokens differ between rollout and learning, so the PPO
    # ratio would not start at 1; and the critic's values would be noisy.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def build_models(config: PPOStageConfig, tokenizer: PreTrainedTokenizerBase):
    """Policy, critic and (unless LoRA makes it the policy with its adapter off) a frozen reference."""
    policy = load_causal_lm(config.policy)
    critic = load_reward_model(config.critic or config.reward_model, tokenizer.pad_token_id)
    reference = None

    def lora(task_type: str) -> LoraConfig:  # no LoRA dropout: dropout is off everywhere in PPO
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=config.lora_target_modules, task_type=task_type)

    if config.use_lora:
        policy = get_peft_model(policy, lora("CAUSAL_LM"))
    else:
        reference = load_causal_lm(config.policy).requires_grad_(False).eval()
        disable_dropout(reference)
        if config.trainable_layers:
            freeze_lower_blocks(policy, config.trainable_layers)
    if config.critic_use_lora:
        critic = get_peft_model(critic, lora("SEQ_CLS"))
    elif config.trainable_layers:
        freeze_lower_blocks(critic, config.trainable_layers)
    for model in (policy, critic):
        disable_dropout(model)
    return policy, critic, reference


def check_tokenizers_match(policy: str, tokenizer: PreTrainedTokenizerBase, other: str) -> None:
    """The RM must read the token ids the policy writes: same vocabulary, same chat template, same EOS."""
    theirs = load_tokenizer(other)
    if (tokenizer.get_vocab() != theirs.get_vocab() or tokenizer.eos_token_id != theirs.eos_token_id
            or tokenizer.chat_template != theirs.chat_template):
        raise PipelineError(f"the tokenizer of {other} differs from the policy's ({policy}): vocabulary, EOS or "
                            "chat template; train the reward model from the same SFT checkpoint as the policy")


# ----------------------------------------------------------------------------------------------------------
# Rewards


@dataclass
class RewardSource:
    name: str
    weight: float
    scorer: RewardScorer | None = None  # a reward model
    judge: Judge | None = None  # a module:function callable
    normalisation: tuple[float, float] | None = None

    def score(self, prompts: list[str], prompt_ids: list[list[int]], reply_ids: list[list[int]],
              replies: list[str], finished: list[bool]) -> list[float]:
        if self.scorer is not None:
            # The RM reads exactly the tokens the policy produced (reply ids include EOS when it ended).
            scores = self.scorer.score_ids([p + r for p, r in zip(prompt_ids, reply_ids, strict=True)])
            if self.normalisation:
                mean, std = self.normalisation
                scores = [(s - mean) / max(std, 1e-6) for s in scores]
            return scores
        return run_judge(self.judge, self.name, prompts, replies, finished)


def load_reward_sources(config: PPOStageConfig, tokenizer: PreTrainedTokenizerBase,
                        compute: Compute) -> list[RewardSource]:
    specs = [("rm", config.reward_model_weight)] if config.reward_model_weight else []
    for spec, weight in parse_mapping(config.extra_rewards, "extra_rewards").items():
        try:
            specs.append((spec, float(weight)))
        except ValueError:
            raise PipelineError(f"--extra_rewards: weight of {spec!r} must be a number, got {weight!r}") from None
    if not specs:
        raise PipelineError("no reward source: set reward_model_weight above 0 or name extra_rewards")
    sources = []
    for name, weight in specs:
        spec = config.reward_model if name == "rm" else name
        if name == "rm" or Path(spec).expanduser().is_dir():
            check_tokenizers_match(config.policy, tokenizer, spec)
            norm = RewardScorer.stored_normalisation(spec) if config.normalize_reward else None
            scorer = RewardScorer.load(spec, compute)
            disable_dropout(scorer.model)
            sources.append(RewardSource(name, weight, scorer=scorer, normalisation=norm))
        else:
            sources.append(RewardSource(name, weight, judge=load_judge(spec, compute)))
    return sources


# ----------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """One batch of episodes. Sequences are [left-padded prompt | right-padded reply]; the prompt part is
    `context` wide, and reply-aligned tensors ([episodes, reply width]) are zero past each reply's end."""
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    context: int
    reply_mask: torch.Tensor
    finished: torch.Tensor
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def micro(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The rows' sequences with all-padding columns cut off (cheaper forwards): ids, mask, position
        ids and the reply width kept (the reply fills the last columns)."""
        reply_width = max(int(self.reply_mask[rows].sum(dim=1).max()), 1)
        prompt_width = int(self.attention_mask[rows, :self.context].sum(dim=1).max())
        columns = slice(self.context - prompt_width, self.context + reply_width)
        ids, mask = self.sequences[rows, columns], self.attention_mask[rows, columns]
        # Positions count real tokens only, as `generate` counted them under left padding.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids, mask, positions, reply_width


def pad_right(rows: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(rows, (0, width - rows.shape[1]))


# Rollout tensors feed the losses later, so they are made under no_grad, not inference_mode (autograd
# refuses to save inference tensors for backward).
@torch.no_grad()
def sample_replies(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                   config: PPOStageConfig, compute: Compute, seed: int) -> Rollout:
    """Sample one reply per prompt in chunks of generation_batch_size; cut each after its first EOS. Chunk
    k is sampled from seed + its first row: when the caller numbers rows globally, the replies do not
    depend on how many processes share the batch (a 2-process run samples what 1 process samples)."""
    # Left padding: every prompt ends, and every reply starts, at column `context`.
    prompts, prompt_mask = pad_sequences(prompt_ids, tokenizer.pad_token_id, left=True)
    device = compute.device
    prompts, prompt_mask, context = prompts.to(device), prompt_mask.to(device), prompts.shape[1]
    chunks = []
    policy.eval()
    guard = FiniteLogitsGuard()
    for start in range(0, len(prompt_ids), config.generation_batch_size):
        rows = slice(start, start + config.generation_batch_size)
        torch.manual_seed(seed + start)
        with compute.autocast():
            output = policy.generate(input_ids=prompts[rows], attention_mask=prompt_mask[rows], do_sample=True,
                                     temperature=config.temperature, top_k=None, top_p=None,
                                     max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, logits_processor=[guard])
        chunks.append(output[:, context:])
    policy.train()
    guard.check("ppo")
    width = max(chunk.shape[1] for chunk in chunks)
    replies = torch.cat([pad_right(chunk, width) for chunk in chunks])
    # A reply's length runs to its first EOS inclusive, else to the length limit. Lengths, not a pad-id
    # test, mark the reply: the model may sample the pad token's id as an ordinary token.
    is_eos = replies == tokenizer.eos_token_id
    finished = is_eos.any(dim=1)
    lengths = torch.where(finished, is_eos.int().argmax(dim=1) + 1, torch.full_like(finished, width, dtype=torch.long))
    reply_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    replies = torch.where(reply_mask.bool(), replies, tokenizer.pad_token_id)
    return Rollout(torch.cat([prompts, replies], dim=1), torch.cat([prompt_mask, reply_mask], dim=1), context,
                   reply_mask.float(), finished)


@torch.no_grad()
def score_rollout(model: PolicyAndCritic, reference: PreTrainedModel | None, rollout: Rollout,
                  config: PPOStageConfig, compute: Compute) -> None:
    """Fill in the policy's and reference's log-probs and the critic's values, a chunk at a time. Policy and
    reference run under the same autocast on the same micro-batches: identical weights give identical
    log-probs, so the KL penalty of the first update is exactly 0 in every precision."""
    logprobs, ref_logprobs, values, entropy = [], [], [], []
    width = rollout.reply_mask.shape[1]
    for start in range(0, len(rollout.sequences), config.generation_batch_size):
        rows = torch.arange(start, min(start + config.generation_batch_size, len(rollout.sequences)))
        ids, mask, positions, reply_width = rollout.micro(rows)
        targets = ids[:, -reply_width:]
        with compute.autocast():
            logits, value, _ = model(ids, mask, positions, reply_width)
            # With LoRA the reference is the same network with its adapter switched off: no second copy.
            with model.policy.disable_adapter() if reference is None else contextlib.nullcontext():
                ref_logits = reply_logits(model.policy if reference is None else reference, ids, mask, positions,
                                          reply_width)
        chosen, spread = token_logprobs_and_entropy(logits, targets, config.temperature)
        logprobs.append(pad_right(chosen, width))
        entropy.append(pad_right(spread, width))
        values.append(pad_right(value, width))
        ref_logprobs.append(pad_right(token_logprobs(ref_logits, targets, config.temperature), width))
    mask = rollout.reply_mask
    rollout.logprobs = torch.cat(logprobs) * mask
    rollout.ref_logprobs = torch.cat(ref_logprobs) * mask
    rollout.values = torch.cat(values) * mask
    rollout.entropy = torch.cat(entropy) * mask


def reply_token_lists(rollout: Rollout) -> list[list[int]]:
    lengths = rollout.reply_mask.sum(dim=1).long().tolist()
    replies = rollout.sequences[:, rollout.context:]
    return [replies[row, :length].tolist() for row, length in enumerate(lengths)]


def score_replies(sources: list[RewardSource], tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  prompt_ids: list[list[int]], rollout: Rollout,
                  config: PPOStageConfig) -> tuple[torch.Tensor, dict[str, list[float]], list[str]]:
    """The weighted sum of every source's score per reply (clipped, missing-EOS penalty applied), each
    source's scores (for the log) and the replies' texts."""
    reply_ids = reply_token_lists(rollout)
    finished = rollout.finished.tolist()
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in reply_ids]
    total = torch.zeros(len(prompts))
    per_source = {}
    for source in sources:
        per_source[source.name] = source.score(prompts, prompt_ids, reply_ids, texts, finished)
        total += source.weight * torch.tensor(per_source[source.name])
    if config.reward_clip:
        total = total.clamp(-config.reward_clip, config.reward_clip)
    total -= config.missing_eos_penalty * (~rollout.finished.cpu()).float()
    return total.to(rollout.sequences.device), per_source, texts


# ----------------------------------------------------------------------------------------------------------
# Logging and checkpoints


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


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: PolicyAndCritic, reference, tokenizer, sources: list[RewardSource], judge: Judge | None,
             prompts: list[str], prompt_ids: list[list[int]], config: PPOStageConfig, compute: Compute) -> dict:
    """Held-out prompts, a fixed sampling seed: the reward (and each source), the judge's score, sequence KL
    to the reference, length, EOS rate, and a few samples."""
    device = compute.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        rollout = sample_replies(model.policy, tokenizer, prompt_ids, config, compute, seed=config.seed)
    score_rollout(model, reference, rollout, config, compute)
    scores, per_source, texts = score_replies(sources, tokenizer, prompts, prompt_ids, rollout, config)
    metrics = {
        "eval/reward": scores.mean().item(),
        **{f"eval/reward_{name}": statistics.fmean(values) for name, values in per_source.items()},
        "eval/kl": (rollout.logprobs - rollout.ref_logprobs).sum(dim=1).mean().item(),
        "eval/length": rollout.reply_mask.sum(dim=1).mean().item(),
        "eval/eos_rate": rollout.finished.float().mean().item(),
    }
    samples = [{"prompt": p, "reply": t, "reward": round(s, 3)}
               for p, t, s in zip(prompts[:4], texts, scores.tolist(), strict=False)]
    if judge is not None:
        gold = run_judge(judge, config.judge, prompts, texts, rollout.finished.tolist())
        metrics["eval/judge_score"] = statistics.fmean(gold)
        for sample, score in zip(samples, gold, strict=False):
            sample["judge"] = round(score, 3)
    return {**metrics, "samples": samples}


# ----------------------------------------------------------------------------------------------------------
# PPO-ptx data


def ptx_batches(config: PPOStageConfig, tokenizer: PreTrainedTokenizerBase, seed: int):
    """Endless micro-batches of SFT examples with labels on the assistant's tokens only (-100 elsewhere)."""
    limit = config.max_prompt_length + config.max_new_tokens
    encoded = []
    for messages in load_chat_examples(config.ptx_data):
        item = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
        ids, keep = item["input_ids"][:limit], item["assistant_masks"][:limit]
        if any(keep):
            encoded.append((ids, [t if k else -100 for t, k in zip(ids, keep, strict=True)]))
    if not encoded:
        raise PipelineError(f"{config.ptx_data}: no example has assistant tokens within {limit} tokens; PPO-ptx "
                            "needs a chat template with {% generation %} markers and assistant replies")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator)[:config.micro_batch_size].tolist()
        ids, mask = pad_sequences([encoded[i][0] for i in order], tokenizer.pad_token_id)
        labels, _ = pad_sequences([encoded[i][1] for i in order], -100)
        yield ids, mask, labels


# ----------------------------------------------------------------------------------------------------------
# The stage


def validate(config: PPOStageConfig) -> None:
    if config.kl_estimator not in ("k1", "k3"):
        raise PipelineError(f"kl_estimator must be k1 or k3, got {config.kl_estimator!r}")
    if config.temperature <= 0:
        raise PipelineError(f"temperature must be above 0 (log-probs divide by it), got {config.temperature}")
    if config.ptx_coef and not config.ptx_data:
        raise PipelineError("ptx_coef > 0 needs ptx_data: the SFT data to keep fitting (e.g. the SFT train file)")
    if config.use_lora and config.trainable_layers:
        raise PipelineError("use_lora and trainable_layers are two ways to train fewer weights; choose one")


def load_prompt_split(config: PPOStageConfig, tokenizer) -> tuple[list[str], list[list[int]], list[str], list]:
    """Training prompts and the held-out evaluation prompts (the file's last num_eval_prompts), tokenized
    through the chat template, with one error for every prompt over max_prompt_length."""
    prompts = load_prompts(config.prompts, config.prompt_column)
    if len(prompts) <= config.num_eval_prompts:
        raise PipelineError(f"{config.prompts}: {len(prompts)} prompts, but {config.num_eval_prompts} are held out for "
                            "evaluation and the rest train; add prompts or lower num_eval_prompts")
    ids = [prompt_input_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    too_long = [row for row, prompt in enumerate(ids, start=1) if len(prompt) > config.max_prompt_length]
    if too_long:
        raise PipelineError(f"{config.prompts}: {len(too_long)} prompt(s) longer than max_prompt_length "
                            f"{config.max_prompt_length} tokens with the chat template (rows "
                            f"{', '.join(map(str, too_long[:5]))}{' ...' if len(too_long) > 5 else ''}); "
                            "shorten them or raise max_prompt_length")
    split = len(prompts) - config.num_eval_prompts
    return prompts[:split], ids[:split], prompts[split:], ids[split:]


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PPOStageConfig, "ppo", argv)
    inputs = {"policy": describe_parent(config.policy), "reward_model": describe_parent(config.reward_model),
              "prompts": describe_input(config.prompts)}
    if config.critic:
        inputs["critic"] = describe_parent(config.critic)
    if config.ptx_data:
        inputs["ptx_data"] = describe_input(config.ptx_data)
    print_ = fingerprint(config, inputs)
    if not config.force and up_to_date(config.output_dir, print_):
        print(f"ppo: {config.output_dir} is up to date (inputs unchanged); pass --force true to train again")
        return

    state = start_processes()
    processes = state.num_processes
    local_rollout, local_mini = config.rollout_batch_size // processes, config.mini_batch_size // processes
    if (config.rollout_batch_size % config.mini_batch_size or config.mini_batch_size % processes
            or local_mini % config.micro_batch_size):
        raise PipelineError(f"rollout_batch_size ({config.rollout_batch_size}) must be a multiple of mini_batch_size "
                            f"({config.mini_batch_size}), which must be a multiple of processes ({processes}) x "
                            f"micro_batch_size ({config.micro_batch_size})")
    accumulation = local_mini // config.micro_batch_size
    precision = choose_precision(config.precision, state.device)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                              gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation))
    if accelerator.state.deepspeed_plugin is not None:
        # DeepSpeed learns batch sizes from a dataloader or a trainer's "auto" values; this loop has neither.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            {"train_micro_batch_size_per_gpu": config.micro_batch_size, "gradient_accumulation_steps": accumulation,
             "gradient_clipping": config.max_grad_norm})
        # Models load whole (accelerate asked transformers to build them as ZeRO-3 shards): prepare() shards
        # the two trained ones; the frozen reference and reward models stay whole, outside any engine.
        unset_hf_deepspeed_config()
    device, main_process = accelerator.device, accelerator.is_main_process
    compute = Compute(device, precision)

    # Validate everything before any work or any output.
    validate(config)
    require_checkpoint(config.policy, "policy", "run `make sft` or pass --policy <checkpoint>")
    require_checkpoint(config.reward_model, "reward model", "run `make rm` or pass REWARD_MODEL=<folder>")
    tokenizer = load_tokenizer(config.policy)
    if config.critic:
        check_tokenizers_match(config.policy, tokenizer, config.critic)
    train_prompts, train_ids, eval_prompts, eval_ids = load_prompt_split(config, tokenizer)
    if len(train_prompts) < config.rollout_batch_size:
        raise PipelineError(f"{config.prompts}: {len(train_prompts)} training prompts, fewer than one rollout batch "
                            f"({config.rollout_batch_size}); add prompts or lower rollout_batch_size")
    sources = load_reward_sources(config, tokenizer, compute)
    judge = load_judge(config.judge, compute) if config.judge else None
    ptx = ptx_batches(config, tokenizer, config.seed + accelerator.process_index) if config.ptx_coef else None
    if ptx is not None:
        next(ptx)  # reads and checks the SFT data now, not at the first update

    set_seed(config.seed)
    policy, critic, reference = build_models(config, tokenizer)
    output = StagedOutput(config.output_dir, "ppo")
    resume_from = resume_point(output.staging, print_) if output.staging.is_dir() else None
    need = output_bytes([policy, critic], resumable=bool(config.save_every))  # briefly two resume checkpoints
    staging = open_output(output, state, keep=resume_from is not None, need_bytes=need)
    if reference is not None:
        reference.to(device)
    model = PolicyAndCritic(policy, critic)
    # Two learning rates, one optimizer: the critic starts from the RM and can often move faster.
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in policy.parameters() if p.requires_grad]},
         {"params": [p for p in critic.parameters() if p.requires_grad],
          "lr": config.critic_learning_rate or config.learning_rate}],
        lr=config.learning_rate, eps=config.adam_eps, weight_decay=0.0)
    steps = config.num_updates * config.ppo_epochs * (config.rollout_batch_size // config.mini_batch_size)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl = KLController(config.kl_coef, config.target_kl, config.kl_horizon)
    progress = TrainingProgress(kl)
    accelerator.register_for_checkpointing(scheduler, progress)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"ppo: resuming from {resume_from} (update {progress.update} of {config.num_updates})")
    unwrapped: PolicyAndCritic = accelerator.unwrap_model(model)
    log = MetricsLog(staging, main_process, progress.update)

    accelerator.print(f"ppo: {len(train_prompts)} training / {len(eval_prompts)} eval prompts, {config.num_updates} "
                      f"updates of {config.rollout_batch_size} episodes, {processes} process(es); "
                      f"{config.policy} -> {config.output_dir}")
    eval_initial = None
    if progress.update == 0 and config.eval_every:
        with whole_weights(accelerator, model):
            eval_initial = evaluate(unwrapped, reference, tokenizer, sources, judge, eval_prompts, eval_ids, config,
                                    compute)
        log.log(0, eval_initial)
    def across_processes(sums: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(sums, reduction="sum")

    rank_rows = slice(accelerator.process_index * local_rollout, (accelerator.process_index + 1) * local_rollout)
    started, episodes_done = time.time(), 0
    bar = tqdm(range(progress.update, config.num_updates), initial=progress.update, total=config.num_updates,
               desc="ppo", unit="update", disable=not main_process)
    for update in bar:
        tick = time.time()
        # Episode e of the run is prompt order[e % n] of epoch e // n, each epoch a fresh shuffle: the
        # batch of any update follows from its number, so a resumed run sees the same prompts.
        first = update * config.rollout_batch_size
        orders: dict[int, torch.Tensor] = {}  # one shuffle per epoch the batch touches (at most two)
        batch_index = []
        for episode in range(first, first + config.rollout_batch_size):
            epoch, position = divmod(episode, len(train_prompts))
            if epoch not in orders:
                orders[epoch] = torch.randperm(len(train_prompts),
                                               generator=torch.Generator().manual_seed(config.seed + epoch))
            batch_index.append(int(orders[epoch][position]))
        batch_index = batch_index[rank_rows]
        prompts, prompt_ids = [train_prompts[i] for i in batch_index], [train_ids[i] for i in batch_index]

        # 1. Rollout.
        with whole_weights(accelerator, model):
            rollout = sample_replies(unwrapped.policy, tokenizer, prompt_ids, config, compute,
                                     seed=config.seed * 1_000_003 + first + rank_rows.start)
            score_rollout(unwrapped, reference, rollout, config, compute)
        # 2. Rewards.
        scores, per_source, _ = score_replies(sources, tokenizer, prompts, prompt_ids, rollout, config)
        mask = rollout.reply_mask
        token_kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * mask
        rewards = token_rewards(scores, token_kl, mask, kl.coef)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, total=across_processes)
        # 3. Advantages.
        advantages, returns = generalized_advantages(rewards, rollout.values, mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, mask, total=across_processes)
        rollout_seconds = time.time() - tick

        # 4. Learn.
        stats: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            permutation = torch.randperm(local_rollout)
            for mini_start in range(0, local_rollout, local_mini):
                for micro_start in range(mini_start, mini_start + local_mini, config.micro_batch_size):
                    rows = permutation[micro_start:micro_start + config.micro_batch_size]
                    with accelerator.accumulate(model):
                        ids, attention, positions, width = rollout.micro(rows)
                        ptx_ids = ptx_mask = ptx_labels = None
                        if ptx is not None:
                            ptx_ids, ptx_mask, ptx_labels = (t.to(device) for t in next(ptx))
                        with compute.autocast():  # the rollout's numerics: the ratio starts at exactly 1
                            logits, values, ptx_logits = model(ids, attention, positions, width, ptx_ids, ptx_mask)
                        logprobs = token_logprobs(logits, ids[:, -width:], config.temperature)
                        policy_loss, value_loss, step_stats = ppo_losses(
                            logprobs, rollout.logprobs[rows, :width], advantages[rows, :width],
                            values, rollout.values[rows, :width],
                            returns[rows, :width], mask[rows, :width], config.cliprange, config.cliprange_value)
                        loss = policy_loss + config.vf_coef * value_loss
                        if ptx_logits is not None:
                            ptx_loss = torch.nn.functional.cross_entropy(
                                ptx_logits[:, :-1].flatten(0, 1).float(), ptx_labels[:, 1:].flatten())
                            loss = loss + config.ptx_coef * ptx_loss
                            step_stats["loss/ptx"] = ptx_loss.item()
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                            # A NaN step would be written into the weights (and a checkpoint) before any metric
                            # showed it. fp16's loss scaler skips overflowing steps itself; DeepSpeed clips inside
                            # its own step and reports no norm here.
                            if norm is not None and accelerator.scaler is None and not torch.isfinite(norm):
                                raise PipelineError(
                                    f"ppo: non-finite gradient norm at update {update + 1} ({norm.item()}); the step "
                                    "was not taken; lower learning_rate or check the reward sources; checkpoints "
                                    f"(if any) in {staging / RESUME} hold only earlier updates")
                        optimizer.step()
                        optimizer.zero_grad()
                        if accelerator.sync_gradients:
                            scheduler.step()
                    step_stats.update({"loss/policy": policy_loss.item(), "loss/value": value_loss.item()})
                    for key, value in step_stats.items():
                        stats.setdefault(key, []).append(value)

        # Metrics of this update, averaged over processes.
        sequence_kl = token_kl.sum(dim=1).mean().item()
        local = {
            "reward/score": scores.mean().item(),
            **{f"reward/{name}": statistics.fmean(values) for name, values in per_source.items()},
            "objective/kl": sequence_kl,
            "objective/non_score_reward": (-kl.coef * token_kl).sum(dim=1).mean().item(),
            "objective/rlhf_reward": (scores - kl.coef * token_kl.sum(dim=1)).mean().item(),
            "reply/length": mask.sum(dim=1).mean().item(),
            "reply/eos_rate": rollout.finished.float().mean().item(),
            "value/mean": masked_mean(rollout.values, mask).item(),
            "policy/entropy": masked_mean(rollout.entropy, mask).item(),
            **{key: statistics.fmean(values) for key, values in stats.items()},
        }
        gathered = accelerator.reduce(torch.tensor(list(local.values()), device=device), reduction="mean").tolist()
        metrics = dict(zip(local, gathered, strict=True))
        kl.update(metrics["objective/kl"], config.rollout_batch_size)
        episodes_done += config.rollout_batch_size
        metrics.update({"kl_coef": kl.coef, "lr": scheduler.get_last_lr()[0],
                        "episodes": first + config.rollout_batch_size,
                        "time/rollout": rollout_seconds, "time/update": time.time() - tick,
                        "episodes_per_second": config.rollout_batch_size / (time.time() - tick)})
        progress.update = update + 1
        if config.eval_every and (progress.update % config.eval_every == 0 or progress.update == config.num_updates):
            with whole_weights(accelerator, model):
                metrics.update(evaluate(unwrapped, reference, tokenizer, sources, judge, eval_prompts, eval_ids,
                                        config, compute))
        log.log(progress.update, metrics)
        bar.set_postfix(reward=f"{metrics['reward/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        # Checked before saving, so the newest checkpoint is always a good one.
        if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
            raise PipelineError(f"ppo: non-finite metrics at update {progress.update} (loss or reward diverged); "
                                "lower learning_rate or check the reward sources; checkpoints (if any) in "
                                f"{staging / RESUME} hold only earlier updates")
        if config.save_every and progress.update % config.save_every == 0 and progress.update < config.num_updates:
            save_checkpoint(accelerator, staging, progress.update, print_)

    seconds = time.time() - started  # the training loop, with its periodic evaluations
    save_final(accelerator, model, tokenizer, config, staging)
    if main_process:
        final_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        initial = {k: v for k, v in (eval_initial or {}).items() if k.startswith("eval/")}
        summary = {
            **{k.replace("eval/", "final_"): v for k, v in final_eval.items()},
            **{k.replace("eval/", "initial_"): v for k, v in initial.items()},
            "updates": progress.update,
            "episodes": progress.update * config.rollout_batch_size,
            "train_seconds": seconds,
            "episodes_per_second": episodes_done / seconds if seconds else 0.0,
            "kl_coef": kl.coef,
            "samples": metrics.get("samples", []),
        }
        # The critic's folder carries its own small manifest: what it started from and whose critic it is.
        (staging / "value" / "pipeline.json").write_text(json.dumps(
            {"stage": "ppo-critic", "policy_manifest": "../pipeline.json",
             "inputs": {"critic": describe_parent(config.critic or config.reward_model)}}, indent=2) + "\n")
        final = output.commit(config, inputs, summary, print_)
        line = f"ppo: {progress.update} updates, {summary['episodes_per_second']:.2f} episodes/s"
        for key, label in (("eval/reward", "held-out reward"), ("eval/judge_score", "judge"), ("eval/kl", "KL"),
                           ("eval/length", "length")):
            if key in final_eval:
                line += f"; {label} " + (f"{initial[key]:.3f} -> " if key in initial else "") + f"{final_eval[key]:.3f}"
        print(f"{line}; wrote {final}")
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
    (LoRA merged unless merge: false). The full state dict is gathered first (ZeRO-3 shards it)."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    parts = (("policy", staging, config.use_lora), ("critic", staging / "value", config.critic_use_lora))
    for name, folder, lora in parts:
        network = getattr(unwrapped, name)
        weights = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(f"{name}.")}
        if lora and config.merge:
            network.load_state_dict(weights)
            network.merge_and_unload().save_pretrained(folder)
        else:
            network.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)
