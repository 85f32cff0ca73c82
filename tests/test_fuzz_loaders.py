"""Fuzzing every data loader: a malformed file either loads cleanly or stops with one PipelineError.

Hypothesis writes wrong JSON types at every level, missing and extra keys, empty strings, unknown roles,
rankings that are not permutations, NaN/inf/huge scores, unicode and control characters, truncated lines,
garbage bytes, ragged CSV and empty files into JSONL, JSON, CSV and Parquet files. Each loader must either
return its documented shape or raise PipelineError on one line that starts with the file (and the line or
row, where there is one); any other exception is a bug in the loader. The human-ranking import must also
leave no output folder behind when it refuses a file. Examples are derandomized, so CI runs the same ones.
"""

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common.errors import PipelineError
from data.annotate import import_rankings
from data.annotate import main as annotate_main
from data.chat import load_chat_examples
from data.preferences import PreferencePair, load_preference_pairs
from data.prompts import load_prompts
from data.tables import Table, read_table

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Values a user's file really holds, and the edge cases around them.
WORDS = st.sampled_from(["hi", "hello there", "How was your day?", "Fine, thanks.", "é🙂 ok", "a\tb", "x" * 200,
                         "Human: hi", "line one\nline two", "[citation] yes"]) | st.text(min_size=1, max_size=8)
# Nesting beyond the recursion limit and digits beyond Python's int-conversion limit, built lazily so that failure
# reports stay short.
HUGE = st.sampled_from([("[", 3000), ("9", 5000)]).map(lambda repeat: repeat[0] * repeat[1])
TEXTS = WORDS | HUGE | st.sampled_from([
    "", " ", "\n", "\x00", "\x1b[31m", "\ufeff", "\u2028", "\ud800", '"', ",", "[", "[1, 2]", "{}", "null",
    "NaN", "true", "False", "user", "3,1,2", " 1, 2, 3", "[2,1]", "first", "1,,2",
    '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]',
    "\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
])
NUMBERS = st.integers(-2, 5) | st.integers() | st.floats() | st.sampled_from([1, -1]).map(lambda sign: sign * 10 ** 400)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXTS
KEYS = st.sampled_from(["messages", "prompt", "completion", "text", "conversations", "chosen", "rejected",
                        "responses", "ranking", "scores", "finished", "id", "role", "content", "from", "value",
                        "question", "response_1", ""]) | st.text(max_size=6)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                    max_leaves=6)
ROLES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "model", "robot", "", "User"])


@st.composite
def mutated(draw, value: Any, top: bool = True) -> Any:
    """`value` with one node somewhere inside it dropped, duplicated, given a sibling or replaced by junk."""
    if isinstance(value, dict) and value and draw(st.integers(0, 3)):
        copy, key = dict(value), draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["descend", "descend", "drop", "junk", "extra"]))
        if action == "descend":
            copy[key] = draw(mutated(value[key], top=False))
        elif action == "drop":
            del copy[key]
        elif action == "junk":
            copy[key] = draw(JUNK)
        else:
            copy[draw(KEYS)] = draw(JUNK)
        return copy
    if isinstance(value, list) and value and draw(st.integers(0, 3)):
        copy, index = list(value), draw(st.integers(0, len(value) - 1))
        action = draw(st.sampled_from(["descend", "drop", "junk", "duplicate"]))
        if action == "descend":
            copy[index] = draw(mutated(value[index], top=False))
        elif action == "drop":
            del copy[index]
        elif action == "junk":
            copy[index] = draw(JUNK)
        else:
            copy.insert(index, value[index])
        return copy
    return draw(JUNK if top else JUNK | TEXTS | ROLES)


@st.composite
def rows_of(draw, good: st.SearchStrategy, mutations: tuple[int, ...] = (0, 0, 0, 1, 1, 2)) -> Any:
    """A valid row (half the time by default, so that whole files load too), or one with a few mutations."""
    row = draw(good)
    for _ in range(draw(st.sampled_from(mutations))):
        row = draw(mutated(row))
    return row


@st.composite
def dialogues(draw) -> list[dict]:
    messages = [{"role": "system", "content": draw(WORDS)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 2))):
        messages += [{"role": draw(st.sampled_from(["user", "human"])), "content": draw(WORDS)},
                     {"role": draw(st.sampled_from(["assistant", "gpt", "model"])), "content": draw(WORDS)}]
    return messages


def hh_text(messages: list[dict]) -> str:
    return "".join(f"\n\n{'Human' if m['role'] in ('user', 'human') else 'Assistant'}: {m['content']}"
                   for m in messages if m["role"] != "system")


def sharegpt(messages: list[dict]) -> list[dict]:
    return [{"from": m["role"], "value": m["content"]} for m in messages]


# ---------------------------------------------------------------------------------------------------------------
# Files: rows serialised as JSONL, JSON, CSV or Parquet, then possibly corrupted at the byte level.

RAW_LINES = [b"[" * 3000, b'{"messages": ' + b"9" * 5000 + b"}", b"{", b'{"a": 1}{"b": 2}', b"\x00\x01\x02",
             b'"just a string"', b"NaN", b"[1, 2", b"\xff\xfe\xfd", b"\xc3", b'{"prompt": "\\ud800"}']


def csv_cell(value: Any) -> str:
    # In CSV, lists and numbers travel as JSON text (as the README says for messages); None is a blank cell.
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def to_csv(draw, rows: list) -> str:
    header = sorted({key for row in rows if isinstance(row, dict) for key in row})
    if draw(st.integers(0, 5)) == 0:  # a header that lost, gained or reordered a column
        shuffled = draw(st.permutations([*header, draw(KEYS)]))
        header = shuffled[: draw(st.integers(0, len(shuffled)))]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header or draw(st.booleans()):
        writer.writerow(header)
    for row in rows:
        cells = [csv_cell(row.get(key)) for key in header] if isinstance(row, dict) else [csv_cell(row)]
        ragged = draw(st.sampled_from(["keep"] * 6 + ["short", "long"]))
        cells = cells[:-1] if ragged == "short" else cells + [draw(TEXTS)] if ragged == "long" else cells
        writer.writerow(cells)
    return buffer.getvalue()


def to_parquet(rows: list) -> bytes:
    rows = [row if isinstance(row, dict) else {"row": row} for row in rows]
    buffer = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(rows), buffer)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeError):
        # Columns pyarrow cannot type (mixed or huge values, empty structs) go in as JSON text, as an export would.
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{key: json.dumps(value) for key, value in row.items()}
                                             for row in rows]), buffer)
    return buffer.getvalue()


@st.composite
def files(draw, rows: st.SearchStrategy, suffixes: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet"),
          max_rows: int = 3):
    """(suffix, bytes) of a data file holding some drawn rows, possibly truncated, spliced, emptied or replaced."""
    suffix = draw(st.sampled_from(suffixes))
    content = draw(st.lists(rows, min_size=1, max_size=max_rows))  # empty files come from the "blank" corruption
    if suffix == ".parquet":
        data = to_parquet(content)
    else:
        if suffix == ".jsonl":
            separator = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
            text = "".join(json.dumps(row, ensure_ascii=draw(st.booleans())) + separator for row in content)
        elif suffix == ".json":  # sometimes one object or a scalar where the list of rows belongs
            text = json.dumps(draw(st.sampled_from([content] * 4 + [content[0], {"rows": content}, None])))
        else:
            text = to_csv(draw, content)
        data = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8
    corruption = draw(st.sampled_from(["none"] * 12 + ["truncate", "splice", "garbage", "blank", "bom", "line"]))
    if corruption == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif corruption == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif corruption == "garbage":
        data = draw(st.binary(max_size=64))
    elif corruption == "blank":
        data = draw(st.sampled_from([b"", b"\n", b"  \n\n", b"\r\n", b"[]", b"{}"]))
    elif corruption == "bom":
        data = b"\xef\xbb\xbf" + data
    elif corruption == "line":
        data = data + draw(st.sampled_from(RAW_LINES)) + b"\n"
    return suffix, data


def write(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


def load_or_refuse(load: Callable[[], Any], path: Path) -> Any | None:
    """The loader's result, or None after checking its PipelineError: one line, starting with the file and,
    where there is one, the line/item/row. Any other exception fails the test (and Hypothesis shrinks it)."""
    try:
        result = load()
    except PipelineError as err:
        message = str(err)
        assert "\n" not in message, message
        assert re.match(re.escape(str(path)) + r"(:\d+(:\d+)?| item \d+| row \d+)?[: ]", message), message
        event("refused")
        return None
    event("loaded")
    return result


def check_dialogue_shape(messages: list[dict]) -> None:
    assert messages and all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    assert turns and [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert all(m["content"].strip() for m in turns)


# ---------------------------------------------------------------------------------------------------------------
# The loaders.

TABLE_ROWS = rows_of(st.dictionaries(KEYS, JUNK, max_size=4))


@FUZZ
@given(files(TABLE_ROWS))
def test_read_table(file):
    suffix, data = file
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "table" + suffix, data)
        table = load_or_refuse(lambda: read_table(str(path)), path)
        if table is not None:
            assert isinstance(table, Table) and table.rows and len(table.rows) == len(table.locations)
            assert all(isinstance(row, dict) for row in table.rows)
            assert all(isinstance(column, str) for column in table.columns)
            assert all(location.startswith(str(path)) for location in table.locations)


COLUMN_MAPS = [{}, {"messages": "conversations"}, {"prompt": "question", "completion": "answer"}, {"text": "dialog"}]


@st.composite
def chat_rows(draw) -> dict:
    messages = draw(dialogues())
    if draw(st.integers(0, 3)) == 0:  # a role that does not exist, or is not even a string
        index = draw(st.integers(0, len(messages) - 1))
        messages[index] = {**messages[index], "role": draw(ROLES | JUNK)}
    shape = draw(st.sampled_from(["messages", "sharegpt", "strings", "lists", "text"]))
    if shape == "messages":
        return {"messages": messages}
    if shape == "sharegpt":
        return {"messages": sharegpt(messages)}
    if shape == "strings":
        return {"prompt": messages[-2]["content"], "completion": messages[-1]["content"]}
    if shape == "lists":
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    return {"text": hh_text(messages)}


@FUZZ
@given(st.data())
def test_chat_examples(data):
    columns = data.draw(st.sampled_from(COLUMN_MAPS))
    suffix, content = data.draw(files(rows_of(chat_rows().map(
        lambda row: {columns.get(key, key): value for key, value in row.items()}))))
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "chat" + suffix, content)
        examples = load_or_refuse(lambda: load_chat_examples(str(path), columns), path)
        if examples is not None:
            assert len(examples) == len(read_table(str(path)).rows)
            for messages in examples:
                check_dialogue_shape(messages)


def rankings(k: int, base: int) -> st.SearchStrategy:
    """Permutations of base..base+k-1 (best first) and the ways people get them almost right."""
    order = st.permutations(range(base, base + k))
    return st.one_of(
        order, order, order, order, order.map(lambda o: ",".join(map(str, o))),
        order.map(lambda o: " " + ", ".join(map(str, o))),
        order.map(lambda o: [float(i) for i in o]), order.map(lambda o: [str(i) for i in o]),
        order.map(lambda o: [str(o[0]), *o[1:]]),
        order.map(lambda o: [i + 1 - 2 * base for i in o]), order.map(lambda o: [bool(i) if i < 2 else i for i in o]),
        order.map(lambda o: [*o, o[0]]), order.map(lambda o: o[:-1]), st.lists(st.integers(-1, k + 1), max_size=k + 1),
        st.sampled_from([None, "", " "]), JUNK,
    )


SPECIAL_SCORES = st.sampled_from(range(9)).map(  # indices keep reports short: 10 ** 400 has 401 digits
    lambda i: [math.nan, math.inf, -math.inf, 1.7e308, -1.7e308, 10 ** 400, "0.5", True, None][i])


def scores(k: int) -> st.SearchStrategy:
    """K ordinary scores, the same with one NaN/inf/huge/string/bool among them, or other wrong values."""
    fine = st.lists(st.floats(-5, 5) | st.integers(-3, 3), min_size=k, max_size=k)
    one_special = st.tuples(fine, st.integers(0, k - 1), SPECIAL_SCORES).map(
        lambda drawn: [*drawn[0][:drawn[1]], drawn[2], *drawn[0][drawn[1] + 1:]])
    return fine | one_special | one_special | st.lists(NUMBERS, min_size=k, max_size=k) | \
        st.lists(SCALARS, max_size=k + 1) | JUNK


FLAGS = st.booleans() | st.sampled_from(["true", "False", "yes", 1, 0.0, None, [True]])


@st.composite
def preference_rows(draw) -> dict:
    prompt = draw(dialogues())[:-1]
    chosen, rejected = draw(WORDS), draw(WORDS)
    shape = draw(st.sampled_from(["strings", "chat", "implicit", "hh", "ranking", "ranking", "scores", "scores"]))
    if shape in ("ranking", "scores"):
        k = draw(st.integers(2, 4))
        row = {"prompt": prompt[-1]["content"], "responses": draw(st.lists(WORDS, min_size=k, max_size=k))}
        row.update({"ranking": draw(rankings(k, 0))} if shape == "ranking" else {"scores": draw(scores(k))})
        if draw(st.booleans()):
            row["finished"] = draw(st.lists(st.booleans(), min_size=k, max_size=k) |
                                   st.lists(FLAGS, min_size=k, max_size=k) | JUNK)
        return row
    if shape == "strings":
        row = {"prompt": prompt[-1]["content"], "chosen": chosen, "rejected": rejected}
    elif shape == "chat":
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    elif shape == "implicit":
        row = {"chosen": [*prompt, {"role": "assistant", "content": chosen}],
               "rejected": [*prompt, {"role": "assistant", "content": rejected}]}
    else:
        row = {"chosen": hh_text([*prompt, {"role": "assistant", "content": chosen}]),
               "rejected": hh_text([*prompt, {"role": "assistant", "content": rejected}])}
    if draw(st.booleans()):
        row.update(chosen_finished=draw(FLAGS), rejected_finished=draw(FLAGS))
    return row


PREFERENCE_MAPS = [{}, {"chosen": "good", "rejected": "bad"}, {"prompt": "question", "responses": "replies"}]


@settings(FUZZ, max_examples=300)  # the ranked shapes hide the most cases (NaN, inf, huge or mixed-type values)
@given(st.data(), st.sampled_from([0.0, 0.5]))
def test_preference_pairs(data, min_margin):
    columns = data.draw(st.sampled_from(PREFERENCE_MAPS))
    suffix, content = data.draw(files(rows_of(preference_rows().map(
        lambda row: {columns.get(key, key): value for key, value in row.items()}))))
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "prefs" + suffix, content)
        pairs = load_or_refuse(lambda: load_preference_pairs(str(path), columns, min_margin), path)
        if pairs is not None:
            assert pairs and all(isinstance(pair, PreferencePair) for pair in pairs)
            for pair in pairs:
                check_dialogue_shape([*pair.prompt, {"role": "assistant", "content": pair.chosen}])
                assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen.strip() != pair.rejected.strip()
                assert pair.margin == 0.0 or pair.margin > min_margin  # NaN is neither
                assert isinstance(pair.chosen_finished, bool) and isinstance(pair.rejected_finished, bool)
                assert pair.location.startswith(str(path))
                json.dumps(pair.as_row(), allow_nan=False)  # what make rm reads must be plain JSON


@st.composite
def prompt_rows(draw) -> dict:
    messages = draw(dialogues())[:-1]
    value = draw(st.sampled_from([messages[-1]["content"], messages, sharegpt(messages)]))
    return {"prompt": value}


@FUZZ
@given(st.data())
def test_prompts(data):
    column = data.draw(st.sampled_from(["prompt", "question"]))
    suffix, content = data.draw(files(rows_of(prompt_rows().map(lambda row: {column: row["prompt"]}))))
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "prompts" + suffix, content)
        prompts = load_or_refuse(lambda: load_prompts(str(path), column), path)
        if prompts is not None:
            assert len(prompts) == len(read_table(str(path)).rows)
            assert all(isinstance(prompt, str) and prompt.strip() for prompt in prompts)


CANDIDATES = [
    {"prompt": "How was your day?", "responses": ["Great!", "Bad.", "Fine."], "finished": [True, False, True]},
    {"prompt": "Tell me a joke", "responses": ["No.", "Why did the chicken cross the road?", "Knock knock", "Ha"],
     "finished": [True, True, False, True]},
    {"prompt": "é🙂 ok\nsecond line", "responses": ["yes, \"quoted\"", "no, comma"], "finished": [True, True]},
]


@st.composite
def ranking_rows(draw, suffix: str) -> dict:
    """A row of the exported file (CSV: one column per response) with an annotator's ranking, 1-based."""
    identifier = draw(st.integers(0, len(CANDIDATES) - 1))
    original = CANDIDATES[identifier]
    k = len(original["responses"])
    row = {"id": draw(st.sampled_from([identifier] * 8 + [str(identifier), f" {identifier} ", float(identifier),
                                                         math.inf, math.nan, None, "#1"])),
           "prompt": original["prompt"]}
    if suffix == ".csv":
        row.update({f"response_{i}": text for i, text in enumerate(original["responses"], start=1)})
    else:
        row["responses"] = original["responses"]
    row["ranking"] = draw(rankings(k, 1))
    return row


def run_import(candidates: Path, path: Path, output: Path) -> bool:
    annotate_main(["--action", "import", "--candidates", str(candidates), "--file", str(path),
                   "--output_dir", str(output)])
    return True


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_human_ranking_import(data):
    suffix = data.draw(st.sampled_from([".csv", ".jsonl"]))
    # Fewer mutations and rows: the rankings are mostly near misses already, and a whole file must be valid to be
    # imported (which is where a float ranking broke the pair expansion).
    rows = rows_of(ranking_rows(suffix), mutations=(0, 0, 0, 0, 1, 2))
    _, content = data.draw(files(rows, suffixes=(suffix,), max_rows=2))
    with tempfile.TemporaryDirectory() as folder:
        candidates = write(folder, "candidates.jsonl", "".join(json.dumps(row) + "\n" for row in CANDIDATES).encode())
        path = write(folder, "to_rank" + suffix, content)
        output = Path(folder) / "human"
        if not load_or_refuse(lambda: run_import(candidates, path, output), path):
            assert sorted(os.listdir(folder)) == sorted([candidates.name, path.name])  # no output, no .partial
            return
        assert sorted(os.listdir(folder)) == sorted([candidates.name, path.name, "human"])
        assert sorted(os.listdir(output)) == ["pairs.jsonl", "pipeline.json", "ranked.jsonl"]
        ranked = [json.loads(line) for line in (output / "ranked.jsonl").read_text(encoding="utf-8").splitlines()]
        assert ranked
        for row in ranked:
            assert {key: row[key] for key in ("prompt", "responses", "finished")} in CANDIDATES
            assert all(type(i) is int for i in row["ranking"])
            assert sorted(row["ranking"]) == list(range(len(row["responses"])))
        # Each ranking expands into its ordered pairs, best first, less those of two identical replies.
        expected = [(row["responses"][better], row["responses"][worse]) for row in ranked
                    for better, worse in combinations(row["ranking"], 2)
                    if row["responses"][better].strip() != row["responses"][worse].strip()]
        pairs = [json.loads(line) for line in (output / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [(pair["chosen"][0]["content"], pair["rejected"][0]["content"]) for pair in pairs] == expected


# ---------------------------------------------------------------------------------------------------------------
# What the fuzzing found, pinned down: each raised a library exception (or, for the Parquet one, a message spanning
# several lines) before the loader was fixed.

def corrupt_parquet() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["hi", "yo"]}), buffer)
    data = buffer.getvalue()
    return data[:4] + b"\xff" * 4 + data[8:]  # a broken page header: Arrow's message has line breaks


RANKED = {"prompt": "q", "responses": ["a", "b"]}
FOUND = {
    "parquet message on several lines": (read_table, "d.parquet", corrupt_parquet(),
                                         r"d\.parquet: not a readable Parquet file \(.*\); re-export it$"),
    "number of 5000 digits": (read_table, "d.jsonl", b'{"prompt": "hi"}\n{"prompt": ' + b"9" * 5000 + b"}\n",
                              r"d\.jsonl:2:1: malformed JSON \(a number with too many digits\)"),
    "nesting too deep": (read_table, "d.json", b"[" * 3000, r"d\.json:1:1: malformed JSON \(lists or objects nested"),
    "nesting too deep in a CSV cell": (load_chat_examples, "d.csv", b"messages\n" + b"[" * 3000 + b"\n",
                                       r"d\.csv:2: 'messages' must be a list of messages \(in CSV: JSON text\)"),
    "role that is a list": (load_chat_examples, "d.jsonl",
                            json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}).encode(),
                            r"d\.jsonl:1: message 1 has role \['user'\]; use system, user or assistant"),
    "ranking with a string": (load_preference_pairs, "d.jsonl", json.dumps({**RANKED, "ranking": [0, "1"]}).encode(),
                              r"d\.jsonl:1: 'ranking' \[0, '1'\] is not a permutation of 0\.\.1"),
    "ranking with floats": (load_preference_pairs, "d.jsonl", json.dumps({**RANKED, "ranking": [1.0, 0.0]}).encode(),
                            r"d\.jsonl:1: 'ranking' \[1\.0, 0\.0\] is not a permutation of 0\.\.1"),
    "NaN score": (load_preference_pairs, "d.jsonl", b'{"prompt": "q", "responses": ["a", "b"], "scores": [NaN, 1]}',
                  r"d\.jsonl:1: 'scores' \[nan, 1\] must be finite numbers"),
    "score beyond float range": (load_preference_pairs, "d.jsonl",
                                 json.dumps({**RANKED, "scores": [10 ** 400, 1.5]}).encode(),
                                 r"d\.jsonl:1: 'scores' \[1000.*, 1\.5\] must be finite numbers"),
    "margin beyond float range": (load_preference_pairs, "d.jsonl",
                                  json.dumps({**RANKED, "scores": [1.7e308, -1.7e308]}).encode(),
                                  r"d\.jsonl:1: 'scores' .* must be finite numbers"),
}
HUMAN = {"id": 0, "prompt": CANDIDATES[0]["prompt"], "responses": CANDIDATES[0]["responses"]}
FOUND_IN_IMPORT = {
    "ranking with floats": ({**HUMAN, "ranking": [1.0, 2.0, 3.0]}, r"ranking \[1\.0, 2\.0, 3\.0\] must list each"),
    "ranking with a string": ({**HUMAN, "ranking": [1, "2", 3]}, r"ranking \[1, '2', 3\] must list each"),
    "infinite id": ({**HUMAN, "id": math.inf, "ranking": [1, 2, 3]}, r"id inf is not one of the exported ids 0\.\.2"),
    "responses not a list": ({**HUMAN, "responses": 5, "ranking": [1, 2, 3]},
                             r"prompt or responses differ from exported id 0"),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_cases_the_fuzzing_found(tmp_path, case):
    load, name, data, pattern = FOUND[case]
    path = write(str(tmp_path), name, data)
    with pytest.raises(PipelineError, match="^" + re.escape(str(tmp_path) + os.sep) + pattern) as caught:
        load(str(path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("interpreter", ["3.11", "3.12.3+"])
def test_deep_nesting_reads_the_same_whatever_the_interpreter_reports(tmp_path, monkeypatch, interpreter):
    def loads(text):  # what each interpreter's json module does with "[" * 3000
        if interpreter == "3.11":
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
        raise json.JSONDecodeError("Expecting value", text, len(text))

    path = write(str(tmp_path), "d.json", b"[" * 3000)
    with monkeypatch.context() as patched:
        patched.setattr("data.tables.json.loads", loads)
        with pytest.raises(PipelineError, match=r"d\.json:1:1: malformed JSON \(lists or objects nested too deeply"):
            read_table(str(path))
    shallow = write(str(tmp_path), "e.json", b"[[1,")  # an ordinary truncated file keeps its own message
    with pytest.raises(PipelineError, match=r"e\.json:1:5: malformed JSON \(Expecting value\)"):
        read_table(str(shallow))


@pytest.mark.parametrize("case", list(FOUND_IN_IMPORT))
def test_import_cases_the_fuzzing_found(tmp_path, case):
    row, pattern = FOUND_IN_IMPORT[case]
    path = write(str(tmp_path), "to_rank.jsonl", json.dumps(row).encode() + b"\n")  # Infinity for math.inf
    with pytest.raises(PipelineError, match="^" + re.escape(str(path)) + ":1: " + pattern):
        import_rankings(CANDIDATES, str(path))
