"""PPO's periodic evaluation on prompts held out of training, with a fixed sampling seed."""

import statistics

import torch

from common.precision import Compute
from data.judges import Judge, run_judge
from ppo.config import PPOStageConfig
from ppo.models import PolicyAndCritic
from ppo.rewards import RewardSource, score_replies
from ppo.rollout import sample_replies, score_rollout


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
