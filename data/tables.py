"""Read rows from JSONL, JSON, CSV, Parquet, a `datasets.save_to_disk` folder or a hub dataset name.

Every row keeps a location ("file.jsonl:12", "file.parquet row 5") so a validation error can say
exactly where the problem is. File-format errors name the file, line and column.
"""

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import PipelineError

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


@dataclass
class Table:
    source: str
    rows: list[dict[str, Any]]
    locations: list[str]

    @property
    def columns(self) -> list[str]:
        return sorted({key for row in self.rows for key in row})


# UTF-8, with or without the byte-order mark that spreadsheet programs put in front of "CSV UTF-8" exports.
TEXT = "utf-8-sig"


# Deeper than any real data. Python 3.11 raises RecursionError near 1000 levels; 3.12.3+ parses deeper and
# reports a truncated file as "Expecting value" at its end: both become the same message.
MAX_NESTING = 900
NESTING = "lists or objects nested too deeply"


def nesting_depth(text: str) -> int:
    """How deep lists and objects open, counting brackets outside strings (only called on text that failed)."""
    outside = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    depth = deepest = 0
    for char in outside:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(text: str) -> Any:
    """json.loads, where the inputs it refuses without a JSONDecodeError raise one too, so that callers report
    them like any malformed JSON: integers beyond Python's int-conversion limit (4300 digits; a ValueError) and
    nesting deeper than the recursion limit. Neither is real data; both are a broken file. A malformed text
    nested deeper than MAX_NESTING is reported as nesting, whichever error this interpreter gives for it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if nesting_depth(text) > MAX_NESTING:
            raise json.JSONDecodeError(NESTING, text, 0) from None
        raise
    except ValueError:
        raise json.JSONDecodeError("a number with too many digits", text, 0) from None
    except RecursionError:
        raise json.JSONDecodeError(NESTING, text, 0) from None


def _read_jsonl(path: Path) -> Table:
    rows, locations = [], []
    with path.open(encoding=TEXT) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = parse_json(line)
            except json.JSONDecodeError as err:
                raise PipelineError(
                    f"{path}:{number}:{err.colno}: malformed JSON ({err.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            locations.append(f"{path}:{number}")
    return Table(str(path), rows, locations)


def _read_json(path: Path) -> Table:
    try:
        data = parse_json(path.read_text(encoding=TEXT))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}:{err.lineno}:{err.colno}: malformed JSON ({err.msg}); fix the file") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise PipelineError(f"{path}: expected a JSON list of objects (one per example); for one object per "
                            "line, name the file .jsonl")
    return Table(str(path), data, [f"{path} item {i}" for i in range(len(data))])


def _read_csv(path: Path) -> Table:
    rows, locations = [], []
    with path.open(encoding=TEXT, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                if None in row:
                    raise PipelineError(f"{path}:{reader.line_num}: more cells than header columns; quote cells "
                                        "that contain commas")
                rows.append(row)
                locations.append(f"{path}:{reader.line_num}")
        except csv.Error as err:
            raise PipelineError(f"{path}:{reader.line_num}: malformed CSV ({err}); fix the quoting") from None
    return Table(str(path), rows, locations)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    try:
        rows = pq.read_table(path).to_pylist()
    except (ArrowException, OSError) as err:
        # Arrow's messages span several lines; the user gets one.
        reason = " ".join(str(err).split())
        raise PipelineError(f"{path}: not a readable Parquet file ({reason}); re-export it") from None
    return Table(str(path), rows, [f"{path} row {i}" for i in range(len(rows))])


def _read_saved_dataset(path: Path) -> Table:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise PipelineError(f"{path}: not a datasets.save_to_disk folder ({err}); pass a file or such a folder") \
            from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise PipelineError(f"{path}: dataset has splits {list(dataset)} but no 'train'; save one split")
        dataset = dataset["train"]
    rows = dataset.to_list()
    return Table(str(path), rows, [f"{path} row {i}" for i in range(len(rows))])


def _read_hub(name: str) -> Table:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split="train")
    except Exception as err:  # the hub client raises many types; all mean "cannot get it"
        raise PipelineError(
            f"{name}: not a local file or folder, and loading it as a hub dataset failed "
            f"({type(err).__name__}); check the path, or go online for hub datasets"
        ) from None
    rows = dataset.to_list()
    return Table(name, rows, [f"{name} row {i}" for i in range(len(rows))])


def read_table(source: str) -> Table:
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        table = _read_saved_dataset(path)
    elif path.is_file():
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
                   ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise PipelineError(f"{source}: unknown file type '{suffix}'; use one of {', '.join(FILE_TYPES)}")
        try:
            table = readers[suffix](path)
        except UnicodeDecodeError as err:
            raise PipelineError(f"{source}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
        except OSError as err:
            raise PipelineError(f"{source}: cannot be read ({err.strerror}); check its permissions") from None
    elif suffix in FILE_TYPES or source.startswith((".", "/", "~")):
        raise PipelineError(f"{source}: file not found; check the path")
    else:
        table = _read_hub(source)
    if not table.rows:
        raise PipelineError(f"{source} is empty: it holds no rows; add examples or pass another file")
    return table


def raise_first_problem(problems: list[str]) -> None:
    """One line for the user: the first bad row with its location, and how many others are bad."""
    if problems:
        more = f" ({len(problems) - 1} more bad rows)" if len(problems) > 1 else ""
        raise PipelineError(problems[0] + more)
