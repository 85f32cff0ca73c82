"""The four networks of PPO: the policy and critic that learn (one module, one optimizer), the frozen
reference, and the forward passes that read logits and values at the reply's positions."""

import dataclasses
from collections.abc import Callable

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.adapters import peft_config
from common.errors import PipelineError
from common.modeling import (
    freeze_lower_blocks,
    in_policy_dtypes,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    stored_like,
)
from ppo.config import PPO_REFUSED, PPOStageConfig
from ppo.top_blocks import Start, forward_inputs


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


def reply_logits(policy: PreTrainedModel, input_ids, attention_mask, position_ids, reply_width: int,
                 start: Start | None = None) -> torch.Tensor:
    """Logits at the positions that predict the reply's tokens (the one before each; the reply fills the
    last `reply_width` columns). `logits_to_keep` skips the LM head over the prompt: with a 49k-token
    vocabulary that head is a large share of a small model's compute. With `start` (a block's index and the
    rollout's kept input of it, `ppo/top_blocks.py`) only the blocks from there up run."""
    with forward_inputs(policy, input_ids, start) as tokens:
        return policy(**tokens, attention_mask=attention_without_empty_rows(policy, attention_mask),
                      position_ids=position_ids, use_cache=False, logits_to_keep=reply_width + 1).logits[:, :-1]


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic as one module with one optimizer: what `accelerate` (DDP, DeepSpeed) prepares as a
    unit. A forward pass returns the policy's logits and the critic's values at the positions that predict
    the reply's tokens and, for PPO-ptx, the policy's logits on an SFT batch. `starts`, for policy and critic:
    where their trained blocks begin and the rollout's kept input of that block (`ppo/top_blocks.py`)."""

    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, position_ids, reply_width: int, ptx_ids=None, ptx_mask=None,
                starts: tuple[Start, Start] | None = None):
        policy_start, critic_start = starts or (None, None)
        logits = reply_logits(self.policy, input_ids, attention_mask, position_ids, reply_width, policy_start)
        # The critic is a sequence classifier; its score head applied to each position's hidden state
        # gives a value per token (the classifier itself only reads the last one).
        critic = self.critic.get_base_model() if isinstance(self.critic, PeftModel) else self.critic
        backbone = getattr(critic, critic.base_model_prefix)
        with forward_inputs(backbone, input_ids, critic_start) as tokens:
            hidden = backbone(**tokens, attention_mask=attention_without_empty_rows(critic, attention_mask),
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


def build_models(config: PPOStageConfig, tokenizer: PreTrainedTokenizerBase,
                 frozen_dtype: torch.dtype = torch.float32):
    """Policy, critic and (unless an adapter makes it the policy with its adapter off) a frozen reference, loaded
    and laid out by `for_ppo`. A base under an adapter is loaded in `frozen_dtype` straight away."""
    policy = load_causal_lm(config.policy, frozen_dtype if config.uses_adapter() else torch.float32)
    critic = load_reward_model(config.critic or config.reward_model, tokenizer.pad_token_id,
                               frozen_dtype if config.critic_peft_method != "none" else torch.float32)
    return for_ppo(config, policy, critic, lambda: load_causal_lm(config.reference or config.policy), frozen_dtype)


def for_ppo(config: PPOStageConfig, policy: PreTrainedModel, critic: PreTrainedModel,
            make_reference: Callable[[], PreTrainedModel], frozen_dtype: torch.dtype):
    """Adapters or frozen lower blocks on policy and critic, as the config says, and the reference from
    `make_reference` (none with a policy adapter). What does not train is held in `frozen_dtype` (the compute
    dtype: half the memory in bf16): the base under an adapter, the blocks below `trainable_layers`. A full
    fine-tune's reference is stored parameter by parameter like the policy (fp32 where the policy trains), so
    that the KL of identical weights is exactly 0. No adapter dropout: dropout is off everywhere in PPO."""
    steps = config.optimizer_steps()
    reference = None
    if config.uses_adapter():
        adapter = peft_config(config, policy, "CAUSAL_LM", "ppo", PPO_REFUSED, steps, dropout=0.0)
        policy = in_policy_dtypes(get_peft_model(policy, adapter), frozen_dtype)
    else:
        if config.trainable_layers:
            freeze_lower_blocks(policy, config.trainable_layers)
            in_policy_dtypes(policy, frozen_dtype)
        reference = stored_like(make_reference().requires_grad_(False).eval(), policy)
        disable_dropout(reference)
    if config.critic_peft_method != "none":
        critic_options = dataclasses.replace(config, peft_method=config.critic_peft_method)
        critic = in_policy_dtypes(get_peft_model(critic, peft_config(critic_options, critic, "SEQ_CLS", "ppo critic",
                                                                     PPO_REFUSED, steps, dropout=0.0)), frozen_dtype)
    elif config.trainable_layers:
        freeze_lower_blocks(critic, config.trainable_layers)
        in_policy_dtypes(critic, frozen_dtype)
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
