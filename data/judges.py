"""Judges score replies to prompts. One interface serves labelling preferences and evaluation.

A judge is any callable `judge(prompts: list[str], replies: list[str], finished: list[bool]) -> list[float]`
(`finished[i]` is False when reply i was cut off at the length limit before its end-of-turn token),
named on the command line as `module:function`; a reward-model folder is a judge too. The default, the
gold judge, stands in for a human labeller so alignment can be measured against ground truth (as in
Gao et al. 2022): VADER's human-rated sentiment lexicon scores how positive a reply is, with penalties
for what a person would also mark down: an empty reply, a reply cut off mid-way, and a reply that repeats itself.
"""

import importlib
import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import PipelineError

if TYPE_CHECKING:  # torch and accelerate load only when a reward model judges
    from common.precision import Compute

Judge = Callable[[list[str], list[str], list[bool]], list[float]]

EMPTY_SCORE = -2.0  # below anything VADER gives (its compound score lies in [-1, 1])
TRUNCATION_PENALTY = 0.5
REPETITION_WEIGHT = 1.0  # times the share of repeated word trigrams


@cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def repetition(reply: str) -> float:
    """Share of the reply's word trigrams that already occurred earlier in it (0: none, near 1: a loop)."""
    words = reply.lower().split()
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def gold_judge(prompts: list[str], replies: list[str], finished: list[bool]) -> list[float]:
    scores = []
    for reply, done in zip(replies, finished, strict=True):
        if not reply.strip():
            scores.append(EMPTY_SCORE)
            continue
        score = _vader().polarity_scores(reply)["compound"]
        score -= 0.0 if done else TRUNCATION_PENALTY
        score -= REPETITION_WEIGHT * repetition(reply)
        scores.append(score)
    return scores


def load_callable(spec: str) -> Callable:
    """`package.module:function` -> the function, with one clear error for each way it can be wrong."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise PipelineError(f"{spec!r} is not a callable spec; write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PipelineError(f"cannot import module {module_name!r} for {spec!r} ({err}); check the name and "
                            "that it is on PYTHONPATH") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise PipelineError(f"module {module_name!r} has no callable {attribute!r}; check the spec {spec!r}")
    return function


def load_judge(spec: str, compute: "Compute") -> Judge:
    """A judge from `module:function`, or a reward-model folder (its score is the judgement, computed on
    `compute`'s device and number format)."""
    if Path(spec).expanduser().is_dir():
        from common.reward import RewardScorer

        return RewardScorer.load(spec, compute).judge
    return load_callable(spec)


def run_judge(judge: Judge, spec: str, prompts: list[str], replies: list[str], finished: list[bool]) -> list[float]:
    """Call a judge and check that it kept its side of the interface: one finite number per reply."""
    scores = list(judge(prompts, replies, finished))
    if len(scores) != len(replies):
        raise PipelineError(f"judge {spec} returned {len(scores)} scores for {len(replies)} replies; "
                            "it must return one number per reply")
    bad = [s for s in scores if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s)]
    if bad:
        raise PipelineError(f"judge {spec} returned {bad[0]!r} among its scores; it must return finite numbers")
    return [float(s) for s in scores]
