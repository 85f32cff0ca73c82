"""Collect preference data the InstructGPT way: sample K replies per prompt from a policy, have a labeller
rank them, expand each ranking into its K*(K-1)/2 pairs.

Usage:
    python -m data.collect --config configs/default.yaml                          # embedded default
    python -m data.collect --config configs/default.yaml --labeller mypkg.judges:helpful
    python -m data.collect --config configs/default.yaml --labeller runs/default/rm  # an RM labels
    python -m data.collect --config configs/default.yaml --policy runs/default/ppo --round 2 \
        --output_dir runs/default/round2/prefs                                   # `make rounds`: fresh prompts
    make prefs

Writes `output_dir` per the checkpoint contract: `candidates.jsonl` (prompt, responses, finished: what a
human annotator ranks, see `data.annotate`), `ranked.jsonl` (the same with the labeller's scores; what
`make rm` trains on), `pairs.jsonl` (the expanded pairs, trl's conversational format) and `pipeline.json`.
The prompts must be held apart from PPO and evaluation prompts (the embedded splits are).
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoint import StagedOutput, describe_input, describe_parent, fingerprint, skip_unchanged
from common.config import parse_config
from common.errors import PipelineError, run_cli
from common.options import check_generation_backend, generation_backend_option, precision_option
from data.judges import Judge, load_judge, run_judge
from data.preferences import PreferencePair, ranking_pairs
from data.prompts import load_prompts


@dataclass
class CollectConfig:
    policy: str = field(default="runs/default/sft", metadata={"help": "checkpoint that writes the replies"})
    prompts: str = field(default="runs/default/data/prompts_prefs.jsonl", metadata={"help": "prompt file"})
    output_dir: str = field(default="runs/default/prefs", metadata={"help": "where the files are written"})
    labeller: str = field(default="data.judges:gold_judge",
                          metadata={"help": "module:function judge, or a reward-model folder"})
    num_prompts: int = field(default=0, metadata={"help": "use the first N prompts (0: all)"})
    round: int = field(default=1, metadata={"help": "iterated RLHF round r uses the r-th block of num_prompts "
                                                     "prompts, so no two rounds share a prompt"})
    samples_per_prompt: int = field(default=4, metadata={"help": "K replies per prompt, ranked together"})
    max_new_tokens: int = field(default=32, metadata={"help": "reply length limit; longer replies are cut off"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    generation_backend: str = generation_backend_option()
    prompts_per_batch: int = field(default=8, metadata={"help": "prompts per generate call (x K sequences)"})
    precision: str = precision_option()
    min_margin: float = field(default=0.0, metadata={"help": "pairs whose scores differ by no more are dropped"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})
    force: bool = field(default=False, metadata={"help": "collect again even if the output is up to date"})


def round_prompts(prompts: list[str], config: CollectConfig) -> list[str]:
    """The prompts of this round: block `round` of `num_prompts` (round 1: the first num_prompts, or all)."""
    if config.round == 1:
        return prompts[: config.num_prompts] if config.num_prompts else prompts
    if config.round < 1 or not config.num_prompts:
        raise PipelineError(f"round {config.round} needs num_prompts > 0 (the prompts each round takes) and a round "
                            f">= 1; got num_prompts {config.num_prompts}")
    start = (config.round - 1) * config.num_prompts
    if start + config.num_prompts > len(prompts):
        raise PipelineError(f"{config.prompts}: {len(prompts)} prompts, too few for round {config.round} of "
                            f"{config.num_prompts} new prompts each; add prompts or lower num_prompts")
    return prompts[start:start + config.num_prompts]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def label(rows: list[dict], judge: Judge, spec: str) -> list[dict]:
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    replies = [reply for row in rows for reply in row["responses"]]
    finished = [flag for row in rows for flag in row["finished"]]
    scores = iter(run_judge(judge, spec, prompts, replies, finished))
    return [{**row, "scores": [next(scores) for _ in row["responses"]]} for row in rows]


def expand(ranked: list[dict], min_margin: float) -> list[PreferencePair]:
    """Rows of ranked.jsonl (with labeller `scores` or a human `ranking`) -> all their ordered pairs."""
    pairs = []
    for number, row in enumerate(ranked, start=1):
        scores = row.get("scores")
        order = sorted(range(len(scores)), key=lambda i: -scores[i]) if scores else row["ranking"]
        for better, worse, margin in ranking_pairs(order, scores, min_margin):
            # Two samples can be the same text: such a pair teaches nothing.
            if row["responses"][better].strip() != row["responses"][worse].strip():
                pairs.append(PreferencePair([{"role": "user", "content": row["prompt"]}], row["responses"][better],
                                            row["responses"][worse], margin, f"ranked.jsonl:{number}",
                                            row["finished"][better], row["finished"][worse]))
    return pairs


def main(argv: list[str] | None = None) -> None:
    config = parse_config(CollectConfig, "prefs", argv)
    if config.samples_per_prompt < 2:
        raise PipelineError(f"samples_per_prompt must be at least 2 to rank replies, got {config.samples_per_prompt}")
    check_generation_backend(config.generation_backend)
    inputs = {"policy": describe_parent(config.policy), "prompts": describe_input(config.prompts),
              "labeller": describe_input(config.labeller) if Path(config.labeller).is_dir() else config.labeller}
    print_ = fingerprint(config, inputs)
    if skip_unchanged("prefs", config, print_):
        return
    # The model side loads only now, past the up-to-date check: torch and transformers take 8 s on a CPU,
    # which every `make` that passes this stage would pay.
    from common.modeling import load_tokenizer
    from common.precision import Compute
    from data.sampling import sample_candidates

    # Validate everything (prompts, policy, labeller) before the long sampling run.
    prompts = round_prompts(load_prompts(config.prompts), config)
    tokenizer = load_tokenizer(config.policy)
    compute = Compute.choose(config.precision)
    judge = load_judge(config.labeller, compute)
    output = StagedOutput(config.output_dir, "prefs")
    staging = output.open()

    k = config.samples_per_prompt
    print(f"prefs: {k} replies to each of {len(prompts)} prompts from {config.policy}, labelled by {config.labeller}; "
          f"{compute.device}, {compute.precision}")
    candidates = sample_candidates(config, tokenizer, prompts, compute)
    ranked = label(candidates, judge, config.labeller)
    pairs = expand(ranked, config.min_margin)
    if not pairs:
        raise PipelineError(f"the labeller {config.labeller} scored every reply the same (or within min_margin "
                            f"{config.min_margin}); no preference pairs; check the labeller or lower min_margin")
    write_jsonl(staging / "candidates.jsonl", candidates)
    write_jsonl(staging / "ranked.jsonl", ranked)
    write_jsonl(staging / "pairs.jsonl", [pair.as_row() for pair in pairs])

    scores = [score for row in ranked for score in row["scores"]]
    finished = [flag for row in ranked for flag in row["finished"]]
    metrics = {
        "prompts": len(ranked),
        "replies": len(scores),
        "pairs": len(pairs),
        "pairs_possible": len(ranked) * k * (k - 1) // 2,
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores),
        "finished_rate": sum(finished) / len(finished),
        "mean_margin": statistics.fmean(pair.margin for pair in pairs),
    }
    final = output.commit(config, inputs, metrics, print_)
    print(f"prefs: {metrics['pairs']} pairs from {metrics['prompts']} prompts "
          f"({metrics['pairs_possible'] - metrics['pairs']} ties dropped); score mean {metrics['score_mean']:.3f}, "
          f"{metrics['finished_rate']:.0%} of replies ended with EOS; wrote {final}")


if __name__ == "__main__":
    run_cli(main, stage="prefs", batch_options="prompts_per_batch")
