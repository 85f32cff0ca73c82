"""The evaluation report: `report.json` for machines, `report.md` and PNG plots for people, `replies.jsonl`
with every reply and its scores for whoever wants to look closer."""

import json
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402


def cell(text: str) -> str:
    """A reply as one markdown table cell: no line breaks, no column separators."""
    return text.replace("|", "\\|").replace("\n", " ").strip() or "*(empty)*"


def interval(stat: dict | None, digits: int = 3) -> str:
    if stat is None or math.isnan(stat["mean"]):  # no values: e.g. no pair the judge told apart
        return "n/a"
    return f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"


def kl_cell(stat: dict | None) -> str:
    return interval(stat, 2) if stat else "n/a (other tokenizer)"


def headline(report: dict) -> str:
    """One sentence per compared checkpoint: does it beat the reference under the judge, and at what KL."""
    reference, rows = report["reference"], report["checkpoints"]
    lines = []
    for name, row in rows.items():
        if "win_gold" not in row:
            continue
        win = row["win_gold"]
        verdict = "ahead of" if win["low"] > 0.5 else "behind" if win["high"] < 0.5 else "not distinguishable from"
        kl = f" at a KL of {row['kl']['mean']:.2f} nats from {reference}" if row["kl"] else ""
        lines.append(f"- **{name}** is {verdict} **{reference}** under the judge: it wins {win['mean']:.0%} of the "
                     f"prompts (95% interval {win['low']:.0%} to {win['high']:.0%}; 50% = no difference){kl}; mean "
                     f"judge score {rows[reference]['gold']['mean']:.3f} -> {row['gold']['mean']:.3f}, replies "
                     f"{rows[reference]['length']:.1f} -> {row['length']:.1f} tokens.")
    return "\n".join(lines)


def markdown(report: dict, results: dict[str, dict], prompts: list[str], num_samples: int, plots: list[str],
             rounds_plot: str | None = None) -> str:
    reference, rows = report["reference"], report["checkpoints"]
    accuracy = report["rm_heldout_accuracy"]
    rm_line = f"reward model `{report['reward_model']}`" if report["reward_model"] else "no reward model"
    if accuracy is not None:
        rm_line += f" (held-out pairwise accuracy {accuracy:.3f} on {report['rm_heldout_pairs']} pairs)"
    sampling = report["sampling"]
    lines = [
        "# Evaluation report", "",
        headline(report), "",
        f"{report['num_prompts']} held-out prompts from `{report['prompts']}`, one reply per checkpoint and prompt, "
        f"sampled at temperature {sampling['temperature']} with at most {sampling['max_new_tokens']} new tokens and "
        f"seed {sampling['seed']} for every checkpoint. Judge: `{report['judge']}`; {rm_line}. Brackets hold 95% "
        "bootstrap intervals over prompts.", "",
        "## Scores", "",
        f"| checkpoint | judge score | win rate vs {reference} (judge) | RM score | win rate vs {reference} (RM) | "
        f"KL from {reference} (nats) | length (tokens) | EOS rate | distinct-1 | distinct-2 | SFT-eval perplexity "
        "|",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ppl = row["perplexity"]
        lines.append(
            f"| {name} | {interval(row['gold'])} | {interval(row.get('win_gold')) if name != reference else '-'} | "
            f"{interval(row['rm'])} | {interval(row.get('win_rm')) if name != reference else '-'} | "
            f"{kl_cell(row['kl']) if name != reference else '0 (reference)'} | {row['length']:.1f} | "
            f"{row['eos_rate']:.0%} | "
            f"{row['distinct_1']:.3f} | {row['distinct_2']:.3f} | "
            f"{'n/a' if ppl is None else round(ppl, 2)} |")
    lines += [
        "", "How to read it:",
        "- *judge score*: the judge's mean score of the replies (the gold judge: how positive a reply is, minus "
        "penalties for empty, cut-off and repetitive replies; higher is better).",
        f"- *win rate*: the share of prompts where the checkpoint's reply scores higher than {reference}'s reply to "
        "the same prompt (ties count half). 0.5 means no difference; an interval that excludes 0.5 is a real one.",
        "- *RM score*: what the reward model that PPO optimised thinks. A rise in RM score without a rise in the "
        "judge's score is reward hacking.",
        f"- *KL from {reference}*: how far the checkpoint's replies moved from what {reference} would say (log-prob "
        "difference summed over each reply, averaged); 0 for the reference itself, n/a for another tokenizer.",
        "- *distinct-n*: unique word n-grams over all n-grams of all replies; a collapse means the same reply to "
        "everyone. *SFT-eval perplexity*: how well the checkpoint still predicts the human replies of the SFT eval "
        "set (lower is better; a rise is the alignment tax).",
        "",
    ]
    lines += methods_markdown(report)
    if "rounds" in report:
        lines += rounds_markdown(report, rounds_plot)
    if report["stage_seconds"]:
        stages = report["stage_seconds"]
        lines += ["## Cost", "", "Time each stage of the run took (from its `pipeline.json`), in the order they ran:",
                  "", "| " + " | ".join(stages) + " | total |", "|---" * (len(stages) + 1) + "|",
                  "| " + " | ".join(f"{s / 60:.1f} min" for s in stages.values())
                  + f" | {sum(stages.values()) / 60:.1f} min |", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(plot).stem.replace('_', ' ')}]({plot})" for plot in plots] + [""]
    names = list(results)
    lines += [
        "## Sample replies", "",
        "The first prompts of the set, each checkpoint's reply with its judge score in brackets.", "",
        "| prompt | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i, prompt in enumerate(prompts[:num_samples]):
        replies = [f"{cell(results[n]['replies'][i])} ({results[n]['gold'][i]:+.2f})" for n in names]
        lines.append(f"| {cell(prompt)} | " + " | ".join(replies) + " |")
    return "\n".join(lines) + "\n"


METHODS = {"ppo": "PPO", "dpo": "DPO", "rloo": "RLOO"}


def minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def methods_markdown(report: dict) -> list[str]:
    """The report's "Which method" section: the policies trained by different methods side by side (when at
    least two methods are there; iterated rounds are all PPO), best judge win rate first."""
    reference, checkpoints = report["reference"], report["checkpoints"]
    rows = {name: row for name, row in checkpoints.items()
            if name != reference and row.get("training", {}).get("stage") in METHODS}
    if len({row["training"]["stage"] for row in rows.values()}) < 2:
        return []
    lines = ["## Which method", "",
             f"Each policy below started from the same model and learnt from the same comparisons: DPO from the pairs "
             f"themselves, PPO and RLOO from the reward model trained on them (whose training time is the last "
             f"column). Judge win rates are against {reference}, on the same prompts and sampling as above.", "",
             f"| policy | method | judge win rate vs {reference} | KL from {reference} (nats) | RM score | length "
             "(tokens) | distinct-2 | training time | + reward model |", "|---|---|---|---|---|---|---|---|---|"]
    ranked = sorted(rows, key=lambda name: -rows[name]["win_gold"]["mean"])
    for name in ranked:
        row, training = rows[name], rows[name]["training"]
        lines.append(f"| {name} | {METHODS[training['stage']]} | {interval(row['win_gold'])} | {kl_cell(row['kl'])} "
                     f"| {interval(row['rm'])} | {row['length']:.1f} | {row['distinct_2']:.3f} | "
                     f"{minutes(training['seconds'])} | "
                     f"{'-' if training['stage'] == 'dpo' else minutes(training['reward_model_seconds'])} |")
    return lines + [""]


def rounds_markdown(report: dict, plot: str | None) -> list[str]:
    """The report's "Rounds" section."""
    section, reference, checkpoints = report["rounds"], report["reference"], report["checkpoints"]
    names = list(section["rows"])
    lines = ["## Rounds", "",
             "Round 1 is the first PPO run; round r trained a new reward model on every round's comparisons so far "
             "(new ones sampled from policy r-1) and ran PPO from policy r-1 against it.", "",
             f"| round | win rate vs {reference} (judge) | win rate vs previous round (judge) | judge score "
             f"| KL from {reference} (nats) | its RM's held-out accuracy |", "|---|---|---|---|---|---|"]
    for index, name in enumerate(names):
        row, scores = section["rows"][name], checkpoints[name]
        previous = (interval(row["win_previous"]) + f" vs {names[index - 1]}") if "win_previous" in row else "-"
        accuracy = row["rm_heldout_accuracy"]
        lines.append(f"| {name} | {interval(scores.get('win_gold'))} | {previous} | {interval(scores['gold'])} | "
                     f"{interval(scores['kl'], 2) if scores['kl'] else 'n/a'} | "
                     f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} |")
    policies = list(next(iter(section["shift"].values())))
    lines += ["", "### Distribution shift: each reward model on replies of each policy", "",
              "Pairwise accuracy (95% interval, pairs) of each round's reward model on two replies per prompt sampled "
              "from each policy, ordered by the gold judge (pairs it scores within the margin are left out). A "
              "reward model is trustworthy only on the column of the policy PPO optimises next.", "",
              "| reward model | " + " | ".join(f"replies of {p}" for p in policies) + " |",
              "|---|" + "---|" * len(policies)]
    for rm_name, by_policy in section["shift"].items():
        cells = [f"{interval(by_policy[p])} ({by_policy[p]['n']})" for p in policies]
        lines.append(f"| RM of {rm_name} | " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![over-optimisation]({plot})", "",
                  "Held-out gold-judge and RM scores during each round's PPO against sqrt(KL from the reference). "
                  "Where the gold curve flattens or falls while the RM curve still rises, more updates (or a smaller "
                  "kl_coef) buy reward-model score, not quality."]
    return lines + [""]


def plot_scores(results: dict[str, dict], path: Path) -> None:
    """Histograms of the judge's and the reward model's scores, one outline per checkpoint."""
    panels = [("gold", "judge score")] + ([("rm", "reward-model score")] if any(r["rm"] for r in results.values())
                                          else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        edges = np.histogram_bin_edges([v for r in results.values() for v in r[key]], bins=30)  # shared bins
        for name, result in results.items():
            axis.hist(result[key], bins=edges, histtype="step", linewidth=1.5, label=name)
        axis.set(xlabel=label, ylabel="replies", title=f"{label} per reply, by checkpoint")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_training(rows: list[dict], name: str, path: Path) -> None:
    """PPO's curves: reward and judge score over updates (KL on the right axis), and reward against KL."""
    updates = [row for row in rows if "objective/kl" in row]
    evals = [row for row in rows if "eval/kl" in row]
    figure, (over_time, against_kl) = plt.subplots(1, 2, figsize=(12, 4))
    over_time.plot([r["update"] for r in updates], [r["reward/score"] for r in updates],
                   label="reward (rollouts, normalised RM)")
    if evals and "eval/judge_score" in evals[0]:
        over_time.plot([r["update"] for r in evals], [r["eval/judge_score"] for r in evals], "o-",
                       label="judge score (held-out)")
    over_time.set(xlabel="PPO update", ylabel="score", title=f"{name}: reward and judge score over training")
    kl_axis = over_time.twinx()
    kl_axis.plot([r["update"] for r in updates], [r["objective/kl"] for r in updates], "k--", alpha=0.5, label="KL")
    kl_axis.set_ylabel("KL from the reference (nats)")
    over_time.legend(loc="upper left")
    kl_axis.legend(loc="lower right")
    against_kl.plot([r["objective/kl"] for r in updates], [r["reward/score"] for r in updates], ".",
                    label="reward (rollouts, one dot per update)")
    if evals and "eval/judge_score" in evals[0]:
        against_kl.plot([r["eval/kl"] for r in evals], [r["eval/judge_score"] for r in evals], "o-",
                        label="judge score (held-out)")
    against_kl.set(xlabel="KL from the reference (nats)", ylabel="score", title="what each nat of KL bought")
    against_kl.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(folder: Path, report: dict, results: dict[str, dict], prompts: list[str], num_samples: int) -> None:
    plots = ["score_distributions.png"]
    plot_scores(results, folder / plots[0])
    rounds = {name: row["reward_model"] for name, row in report.get("rounds", {}).get("rows", {}).items()}
    over_optimisation = "over_optimisation.png" if rounds and plot_over_optimisation(
        rounds, results, folder / "over_optimisation.png") else None
    for name, result in results.items():
        log = Path(result["path"]) / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if any("objective/kl" in row for row in rows):
            plots.append(f"{name}_training.png")
            plot_training(rows, name, folder / plots[-1])
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report, results, prompts, num_samples, plots, over_optimisation))
    with (folder / "replies.jsonl").open("w", encoding="utf-8") as handle:
        for i, prompt in enumerate(prompts):
            row = {"prompt": prompt}
            for name, result in results.items():
                row[name] = {"reply": result["replies"][i], "finished": result["finished"][i],
                             "judge": result["gold"][i], "rm": result["rm"][i] if result["rm"] else None}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def plot_over_optimisation(rounds: dict[str, str], results: dict[str, dict], path: Path) -> bool:
    """Gold and RM score against sqrt(KL) over each round's periodic PPO evaluations; False without any."""
    curves = {}
    for name in rounds:
        log = Path(results[name]["path"]) / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        evals = [row for row in rows if "eval/kl" in row and "eval/judge_score" in row]
        if evals:
            curves[name] = evals
    if not curves:
        return False
    figure, (gold, reward) = plt.subplots(1, 2, figsize=(12, 4))
    for name, evals in curves.items():
        # A sampled KL estimate can dip below 0 near the start: clamp before the root.
        root_kl = [math.sqrt(max(row["eval/kl"], 0.0)) for row in evals]
        gold.plot(root_kl, [row["eval/judge_score"] for row in evals], "o-", label=name)
        reward.plot(root_kl, [row["eval/reward"] for row in evals], "o-", label=f"{name} (its own RM)")
    gold.set(xlabel="sqrt(KL from the reference), nats^0.5", ylabel="gold judge score",
             title="gold score over PPO training (held-out prompts)")
    reward.set(xlabel="sqrt(KL from the reference), nats^0.5", ylabel="reward (normalised RM score)",
               title="what PPO optimised")
    for axis in (gold, reward):
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def print_headline(folder: Path) -> None:
    """Where the report is and, for each checkpoint compared with the reference, the numbers that matter (also
    what a skipped evaluation prints, so that a rerun of `make all` still ends with the result)."""
    report = json.loads((folder / "report.json").read_text())
    reference, rows = report["reference"], report["checkpoints"]
    print(f"eval: report {folder / 'report.md'}")
    if report["stage_seconds"]:
        print("eval: stage times " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in
                                               report["stage_seconds"].items())
              + f"; total {sum(report['stage_seconds'].values()) / 60:.1f} min")
    for name, row in rows.items():
        if "win_gold" in row:
            win = row["win_gold"]
            kl = f", KL {row['kl']['mean']:.2f} nats" if row["kl"] else ""
            print(f"eval: {name} vs {reference} under the judge: win rate {win['mean']:.3f} "
                  f"[{win['low']:.3f}, {win['high']:.3f}], score {rows[reference]['gold']['mean']:.3f} -> "
                  f"{row['gold']['mean']:.3f}{kl}, length {rows[reference]['length']:.1f} -> {row['length']:.1f}")
