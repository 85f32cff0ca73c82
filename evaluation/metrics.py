"""The evaluation protocol's numbers, as small functions of per-prompt values (tested against hand-computed
examples). Everything is paired by prompt: checkpoint A's reply to prompt i is compared with the reference's
reply to the same prompt i, sampled with the same seed."""

import numpy as np
import torch


def win_outcomes(scores: list[float], reference: list[float]) -> list[float]:
    """Per prompt: 1 if the checkpoint's reply scored higher than the reference's, 0.5 on a tie, 0 if lower.
    Their mean is the win rate (ties count half, so two equal policies sit at 0.5)."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference, strict=True)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of all replies (Li et al. 2016): 1.0 means no n-gram repeats
    anywhere in the set, near 0 means the policy says the same thing to everyone."""
    grams = [tuple(words[i:i + n]) for words in (text.lower().split() for text in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per reply: sum over its tokens of log pi(token) - log pi_ref(token). The replies are samples of pi,
    so the mean of these is an unbiased estimate of KL(pi || pi_ref) over whole replies (in nats)."""
    return ((logprobs - reference_logprobs) * mask).sum(dim=1).tolist()


def bootstrap_interval(values: list[float], resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the prompts with replacement `resamples` times.
    Prompts, not replies, are the unit, so paired statistics (win outcomes) keep their pairing."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan")
    means = data[np.random.default_rng(seed).integers(0, data.size, (resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_with_interval(values: list[float], resamples: int, seed: int) -> dict:
    """The mean, its 95% bootstrap interval and the number of values (NaNs when there are none)."""
    low, high = bootstrap_interval(values, resamples, seed=seed)
    return {"mean": float(np.mean(values)) if values else float("nan"), "low": low, "high": high, "n": len(values)}
