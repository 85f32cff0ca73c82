"""Iterated RLHF in the evaluation report (`make rounds`): what each round bought, and why.

Three views of the rounds (`report.py` draws them), from what the evaluation sampled and judged:
  - each round's policy against the round before it (gold-judge win rate, paired by prompt);
  - the distribution-shift table: every round's reward model ranks gold-labelled pairs of replies sampled
    from every policy. An RM trained on SFT samples that ranks round-2 samples near chance is the reason to
    collect new comparisons each round (Bai et al. 2022, "iterated online RLHF");
  - over-optimisation: the held-out gold and RM score of each round's PPO run against sqrt(KL from its
    reference), the axis on which Gao et al. 2022 found the gold score peaks while the RM score keeps rising.
"""

from common.checkpoint import read_manifest
from common.precision import Compute
from common.reward import RewardScorer
from evaluation.metrics import mean_with_interval, win_outcomes


def ranking_outcomes(gold: list[tuple[float, float]], rm: list[tuple[float, float]], min_margin: float) -> list[float]:
    """Per pair of replies whose gold scores differ by more than `min_margin`: 1 if the RM orders them as the
    gold judge does, 0.5 on an RM tie, 0 if reversed. Their mean is the RM's pairwise accuracy on those pairs."""
    outcomes = []
    for (gold_a, gold_b), (rm_a, rm_b) in zip(gold, rm, strict=True):
        if abs(gold_a - gold_b) > min_margin:
            agree = (rm_a - rm_b) * (gold_a - gold_b)
            outcomes.append(1.0 if agree > 0 else 0.5 if agree == 0 else 0.0)
    return outcomes


def rounds_summary(rounds: dict[str, str], results: dict[str, dict], shift: dict[str, dict[str, list[float]]],
                   resamples: int, seed: int) -> dict:
    """The report's `rounds` section: per round its RM's held-out accuracy and its win rate against the round
    before; the shift table as accuracy intervals."""
    names, rows = list(rounds), {}
    for index, name in enumerate(names):
        metrics = (read_manifest(rounds[name]) or {}).get("metrics", {})
        row = {"reward_model": rounds[name], "rm_heldout_accuracy": metrics.get("eval_accuracy")}
        if index:
            outcomes = win_outcomes(results[name]["gold"], results[names[index - 1]]["gold"])
            row["win_previous"] = mean_with_interval(outcomes, resamples, seed)
        rows[name] = row
    table = {rm_name: {policy: mean_with_interval(outcomes, resamples, seed) for policy, outcomes in by_policy.items()}
             for rm_name, by_policy in shift.items()}
    return {"rows": rows, "shift": table}


def shift_outcomes(rounds: dict[str, str], results: dict[str, dict], prompts: list[str], compute: Compute,
                   batch_size: int, min_margin: float) -> dict[str, dict[str, list[float]]]:
    """Ranking outcomes of every round's RM (rows) on the reply pairs of every policy that sampled a second
    reply (columns): its first reply and its second, to the same prompt, ordered by the gold judge."""
    table = {}
    for rm_name, path in rounds.items():
        scorer = RewardScorer.load(path, compute, batch_size)
        table[rm_name] = {}
        for policy, result in results.items():
            if "second" not in result:
                continue
            second = result["second"]
            n = len(second["replies"])
            first_rm = scorer.judge(prompts[:n], result["replies"][:n], result["finished"][:n])
            second_rm = scorer.judge(prompts[:n], second["replies"], second["finished"])
            table[rm_name][policy] = ranking_outcomes(list(zip(result["gold"][:n], second["gold"], strict=True)),
                                                      list(zip(first_rm, second_rm, strict=True)), min_margin)
    return table
