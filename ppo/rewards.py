"""Rewards: every source (reward models, `module:function` callables) scores each reply once; the weighted
sum, clipped and with the missing-EOS penalty, is the score PPO lands on the reply's last token (and the one
RLOO's replies are compared by)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from common.config import parse_mapping
from common.errors import PipelineError
from common.options import RewardOptions
from common.precision import Compute
from common.reward import RewardScorer
from data.judges import Judge, load_judge, run_judge
from ppo.config import PPOStageConfig
from ppo.models import check_tokenizers_match, disable_dropout
from ppo.rollout import Rollout, reply_token_lists


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


def load_reward_sources(config: RewardOptions, policy: str, tokenizer: PreTrainedTokenizerBase,
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
            check_tokenizers_match(policy, tokenizer, spec)
            norm = RewardScorer.stored_normalisation(spec) if config.normalize_reward else None
            scorer = RewardScorer.load(spec, compute)
            disable_dropout(scorer.model)
            sources.append(RewardSource(name, weight, scorer=scorer, normalisation=norm))
        else:
            sources.append(RewardSource(name, weight, judge=load_judge(spec, compute)))
    return sources


def combine_scores(sources: list[RewardSource], prompts: list[str], prompt_ids: list[list[int]],
                   reply_ids: list[list[int]], texts: list[str], finished: list[bool],
                   config: RewardOptions) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """The weighted sum of every source's score per reply (clipped, missing-EOS penalty applied) and each
    source's scores (for the log)."""
    total = torch.zeros(len(prompts))
    per_source = {}
    for source in sources:
        per_source[source.name] = source.score(prompts, prompt_ids, reply_ids, texts, finished)
        total += source.weight * torch.tensor(per_source[source.name])
    if config.reward_clip:
        total = total.clamp(-config.reward_clip, config.reward_clip)
    total -= config.missing_eos_penalty * (~torch.tensor(finished, dtype=torch.bool)).float()
    return total, per_source


def score_replies(sources: list[RewardSource], tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  prompt_ids: list[list[int]], rollout: Rollout,
                  config: PPOStageConfig) -> tuple[torch.Tensor, dict[str, list[float]], list[str]]:
    """A rollout's summed scores (on its device), each source's scores and the replies' texts."""
    reply_ids = reply_token_lists(rollout)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in reply_ids]
    total, per_source = combine_scores(sources, prompts, prompt_ids, reply_ids, texts, rollout.finished.tolist(),
                                       config)
    return total.to(rollout.sequences.device), per_source, texts
