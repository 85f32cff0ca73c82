"""Score prompt/response rows (or chosen/rejected pairs) with any reward-model checkpoint.

Usage:
    python -m reward_model.score --model runs/default/rm --data replies.jsonl            # -> replies.scores.jsonl
    python -m reward_model.score --model runs/default/rm --data my_pairs.jsonl --output pair_scores.jsonl
    make score DATA=replies.jsonl [RM=runs/other/rm]

Rows with `prompt` and `response` (strings or chat messages; optional `finished: false` for a reply cut
off at the length limit) get a `score`. Preference files in any shape `make rm` accepts get
`chosen_score` and `rejected_score` per pair, and the pairwise accuracy is printed.
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from common.config import parse_config, parse_mapping
from common.errors import PipelineError, run_cli
from common.options import precision_option
from common.precision import Compute
from common.reward import RewardScorer
from data.chat import Message, RowError, as_messages
from data.preferences import finished_flag, load_preference_pairs, reply_text
from data.tables import Table, raise_first_problem, read_table
from reward_model.train import pairwise_metrics, score_pairs


@dataclass
class ScoreConfig:
    model: str = field(default="runs/default/rm", metadata={"help": "reward-model checkpoint"})
    data: str = field(default="", metadata={"help": "prompt/response rows or preference pairs"})
    output: str = field(default="", metadata={"help": "JSONL to write; empty: <data>.scores.jsonl next to it"})
    columns: str = field(default="", metadata={"help": "column mapping, e.g. response=answer"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    precision: str = precision_option()


def parse_responses(table: Table, columns: dict[str, str]) -> tuple[list[list[Message]], list[str], list[bool]]:
    name = lambda key: columns.get(key, key)  # noqa: E731
    prompts, replies, finished, problems = [], [], [], []
    for row, location in zip(table.rows, table.locations, strict=True):
        try:
            prompt = as_messages(row.get(name("prompt")) or "", name("prompt"), "user")
            if not prompt[-1]["content"].strip():
                raise RowError(f"'{name('prompt')}' is missing or empty")
            if not isinstance(row.get(name("response")), str | list) or not str(row[name("response")]).strip():
                raise RowError(f"'{name('response')}' is missing or empty")
            prompts.append(prompt)
            replies.append(reply_text(row[name("response")], name("response")))
            finished.append(finished_flag(row.get(name("finished")), name("finished")))
        except RowError as err:
            problems.append(f"{location}: {err}")
    raise_first_problem(problems)
    return prompts, replies, finished


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ScoreConfig, "score", argv)
    if not config.data:
        raise PipelineError("no data to score: pass --data replies.jsonl (make score DATA=replies.jsonl)")
    columns = parse_mapping(config.columns, "columns")
    table = read_table(config.data)
    # Validate the data before loading the model; then score.
    if columns.get("response", "response") in table.columns:
        prompts, replies, finished = parse_responses(table, columns)
        scorer = RewardScorer.load(config.model, Compute.choose(config.precision), config.batch_size)
        scores = scorer.score(prompts, replies, finished, progress="score")
        rows = [{**row, "score": score} for row, score in zip(table.rows, scores, strict=True)]
        print(f"score: {len(scores)} replies, mean {statistics.fmean(scores):.3f}, "
              f"std {statistics.pstdev(scores):.3f}, min {min(scores):.3f}, max {max(scores):.3f}")
    else:
        pairs = load_preference_pairs(config.data, columns)
        scorer = RewardScorer.load(config.model, Compute.choose(config.precision), config.batch_size)
        chosen, rejected = score_pairs(scorer, pairs, "score")
        rows = [{**pair.as_row(), "chosen_score": c, "rejected_score": r, "source": pair.location}
                for pair, c, r in zip(pairs, chosen, rejected, strict=True)]
        metrics = pairwise_metrics(chosen, rejected, "pairs")
        print(f"score: {len(pairs)} pairs, accuracy {metrics['pairs_accuracy']:.3f}, "
              f"chosen mean {metrics['pairs_chosen_mean']:.3f}, rejected mean {metrics['pairs_rejected_mean']:.3f}")
    output = Path(config.output or Path(config.data).with_suffix(".scores.jsonl"))
    temporary = output.with_name(output.name + ".partial")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    temporary.rename(output)
    print(f"score: wrote {output}")


if __name__ == "__main__":
    run_cli(main, stage="score", batch_options="batch_size")
