"""Human labelling: export sampled candidates for annotators, import their rankings back.

Usage:
    python -m data.annotate --action export --candidates runs/default/prefs/candidates.jsonl --file to_rank.csv
    (annotators fill the `ranking` column: response numbers best first, e.g. "3,1,4,2")
    python -m data.annotate --action import --candidates runs/default/prefs/candidates.jsonl --file to_rank.csv \\
        --output_dir runs/default/prefs_human
    make prefs-export; make prefs-import; make rm PREFS=runs/default/prefs_human/ranked.jsonl

The export is CSV (one column per response, for spreadsheets) or JSONL (a `responses` list), chosen by
the file's extension. Rows without a ranking are skipped on import (partial annotation is normal); a
ranking that is not a permutation of the response numbers, an unknown id or a changed prompt or response
stops the import with the row named. The import writes `ranked.jsonl` and `pairs.jsonl` (atomic, with
`pipeline.json`), the same files `make prefs` writes.
"""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoint import StagedOutput, describe_input, fingerprint
from common.config import parse_config
from common.errors import PipelineError, run_cli
from data.chat import RowError
from data.collect import expand, write_jsonl
from data.tables import raise_first_problem, read_table


@dataclass
class AnnotateConfig:
    action: str = field(default="export", metadata={"help": "export (write the file) or import (read it back)"})
    candidates: str = field(default="runs/default/prefs/candidates.jsonl",
                            metadata={"help": "candidates.jsonl written by make prefs"})
    file: str = field(default="runs/default/to_rank.csv", metadata={"help": "the annotators' file, .csv or .jsonl"})
    output_dir: str = field(default="runs/default/prefs_human", metadata={"help": "where import writes"})


def read_candidates(path: str) -> list[dict]:
    table = read_table(path)
    if not {"prompt", "responses", "finished"} <= set(table.columns):
        raise PipelineError(f"{path}: not a candidates file (needs prompt, responses, finished); "
                            "use the candidates.jsonl that `make prefs` writes")
    return table.rows


def export(candidates: list[dict], path: Path) -> None:
    k = max(len(row["responses"]) for row in candidates)
    temporary = path.with_name(path.name + ".partial")
    with temporary.open("w", encoding="utf-8", newline="") as handle:
        if path.suffix.lower() == ".csv":
            writer = csv.writer(handle)
            writer.writerow(["id", "prompt", *[f"response_{i}" for i in range(1, k + 1)], "ranking"])
            for number, row in enumerate(candidates):
                writer.writerow([number, row["prompt"], *row["responses"], *[""] * (k - len(row["responses"])), ""])
        else:
            for number, row in enumerate(candidates):
                handle.write(json.dumps({"id": number, "prompt": row["prompt"], "responses": row["responses"],
                                         "ranking": None}, ensure_ascii=False) + "\n")
    temporary.rename(path)


def same_text(edited: list, original: list[str]) -> bool:
    """Spreadsheets may change line endings and trailing spaces; words must stay the same."""
    return len(edited) == len(original) and all(
        isinstance(a, str) and a.split() == b.split() for a, b in zip(edited, original, strict=True))


def parse_ranking(value: object, k: int) -> list[int] | None:
    """Response numbers best first (1-based, as the annotators see them) -> 0-based indices; None if blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.replace(" ", "").strip("[]").split(",")]
        except ValueError:
            raise RowError(f"ranking {value!r} is not a list of response numbers like 3,1,4,2") from None
    # Only ints: floats and bools compare equal to numbers but must not index responses, strings break sorted().
    if not isinstance(value, list) or not all(type(number) is int for number in value) \
            or sorted(value) != list(range(1, k + 1)):
        raise RowError(f"ranking {value!r} must list each of the response numbers 1..{k} once, best first")
    return [number - 1 for number in value]


def import_rankings(candidates: list[dict], path: str) -> list[dict]:
    table = read_table(path)
    ranked, problems = [], []
    for row, location in zip(table.rows, table.locations, strict=True):
        try:
            identifier = int(row.get("id"))
            if not 0 <= identifier < len(candidates):
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an Infinity id
            problems.append(f"{location}: id {row.get('id')!r} is not one of the exported ids 0..{len(candidates) - 1}")
            continue
        original = candidates[identifier]
        k = len(original["responses"])
        responses = row.get("responses") or [row.get(f"response_{i}") for i in range(1, k + 1)]
        try:
            if not isinstance(responses, list) or \
                    not same_text([row.get("prompt"), *responses], [original["prompt"], *original["responses"]]):
                raise RowError(f"prompt or responses differ from exported id {identifier}; edit only the ranking")
            order = parse_ranking(row.get("ranking"), k)
        except RowError as err:
            problems.append(f"{location}: {err}")
            continue
        if order is not None:
            ranked.append({**original, "ranking": order})
    raise_first_problem(problems)
    if not ranked:
        raise PipelineError(f"{path}: no row has a ranking yet; fill the ranking column (e.g. 3,1,4,2), then import")
    return ranked


def main(argv: list[str] | None = None) -> None:
    config = parse_config(AnnotateConfig, "annotate", argv)
    candidates = read_candidates(config.candidates)
    path = Path(config.file)
    if config.action == "export":
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise PipelineError(f"{config.file}: export writes .csv or .jsonl; name the file accordingly")
        path.parent.mkdir(parents=True, exist_ok=True)
        export(candidates, path)
        print(f"annotate: wrote {len(candidates)} prompts to {path}; fill `ranking` with response numbers best "
              f"first (e.g. 3,1,4,2), then run the import")
    elif config.action == "import":
        ranked = import_rankings(candidates, config.file)
        pairs = expand(ranked, 0.0)
        inputs = {"candidates": describe_input(config.candidates), "rankings": describe_input(config.file)}
        output = StagedOutput(config.output_dir, "prefs")
        staging = output.open()
        write_jsonl(staging / "ranked.jsonl", ranked)
        write_jsonl(staging / "pairs.jsonl", [pair.as_row() for pair in pairs])
        final = output.commit(config, inputs, {"prompts": len(ranked), "pairs": len(pairs)},
                              fingerprint(config, inputs))
        print(f"annotate: {len(ranked)} ranked prompts of {len(candidates)} -> {len(pairs)} pairs; wrote {final}")
    else:
        raise PipelineError(f"--action must be export or import, got {config.action!r}")


if __name__ == "__main__":
    run_cli(main)
