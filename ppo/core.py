"""PPO's mathematics: pure functions on [episodes, reply tokens] tensors, no model and no accelerate, each
checkable by hand against "The N+ implementation details of RLHF with PPO" (Huang et al. 2024). `mask` is 1
on real reply tokens and 0 on padding."""

from collections.abc import Callable

import torch


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
