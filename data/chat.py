"""SFT data: every accepted shape becomes a list of chat messages, validated row by row.

Accepted shapes (column names can be remapped with `columns`, e.g. {"messages": "conversations"}):
  messages            [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]
                      (ShareGPT's {"from": "human", "value": ...} is accepted too)
  prompt, completion  strings, or lists of messages
  text                an HH-style transcript "\\n\\nHuman: ... \\n\\nAssistant: ..."
"""

import json
import random
import re
from typing import Any

from common.errors import PipelineError
from data.tables import Table, parse_json, raise_first_problem, read_table

Message = dict[str, str]

ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
DIALOGUE_RULE = "roles must alternate user/assistant (an optional system message first) and end with an assistant reply"


class RowError(ValueError):
    """A problem with one row; the caller adds where it is."""


def parse_hh_transcript(text: str) -> list[Message]:
    """Split "\\n\\nHuman: a\\n\\nAssistant: b" into messages."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError("text is not an HH transcript; it must start with 'Human: ' and contain 'Assistant: ' turns")
    return [{"role": ROLE_ALIASES[speaker.lower()], "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


def normalise_messages(value: Any, field: str) -> list[Message]:
    if isinstance(value, str):
        try:  # CSV cells carry lists as JSON text
            value = parse_json(value)
        except json.JSONDecodeError:
            raise RowError(f"'{field}' must be a list of messages (in CSV: JSON text)") from None
    if not isinstance(value, list) or not value:
        raise RowError(f"'{field}' must be a non-empty list of messages")
    messages = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise RowError(f"message {index} of '{field}' is not an object with role and content")
        role = item.get("role", item.get("from"))
        content = item.get("content", item.get("value"))
        if not isinstance(role, str) or role not in ROLE_ALIASES:  # a list or object role is not even hashable
            raise RowError(f"message {index} has role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise RowError(f"message {index} has no text content")
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    return messages


def as_messages(value: Any, field: str, default_role: str) -> list[Message]:
    """A prompt or completion: a plain string is one message with `default_role`."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [{"role": default_role, "content": value}]
    return normalise_messages(value, field)


def check_dialogue(messages: list[Message]) -> None:
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise RowError(f"no user/assistant turns; {DIALOGUE_RULE}")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = index + 1 + (len(messages) - len(turns))
            raise RowError(f"message {position} has role '{message['role']}' where '{expected}' was expected; "
                           f"{DIALOGUE_RULE}")
        if not message["content"].strip():
            position = index + 1 + (len(messages) - len(turns))
            raise RowError(f"message {position} is an empty {message['role']} turn; remove the row or write the turn")
    if turns[-1]["role"] != "assistant":
        raise RowError(f"the last message is not an assistant reply; {DIALOGUE_RULE}")


def detect_shape(table: Table, columns: dict[str, str]) -> str:
    present = set(table.columns)
    name = lambda key: columns.get(key, key)  # noqa: E731
    if name("messages") in present:
        return "messages"
    if name("prompt") in present and name("completion") in present:
        return "prompt_completion"
    if name("text") in present:
        return "text"
    mapped = f" (mapped: {columns})" if columns else ""
    raise PipelineError(
        f"{table.source}: missing column: found {table.columns}{mapped}; SFT data needs 'messages', "
        "'prompt' and 'completion', or 'text' (HH transcript); map your names with "
        "columns: {messages: your_column} in the config or --columns messages=your_column"
    )


def row_to_messages(row: dict[str, Any], shape: str, columns: dict[str, str]) -> list[Message]:
    name = lambda key: columns.get(key, key)  # noqa: E731
    if shape == "messages":
        messages = normalise_messages(row.get(name("messages")), name("messages"))
    elif shape == "prompt_completion":
        messages = as_messages(row.get(name("prompt")), name("prompt"), "user") + \
            as_messages(row.get(name("completion")), name("completion"), "assistant")
    else:
        text = row.get(name("text"))
        if not isinstance(text, str):
            raise RowError(f"'{name('text')}' is missing or not text")
        messages = parse_hh_transcript(text)
    check_dialogue(messages)
    return messages


def load_chat_examples(source: str, columns: dict[str, str] | None = None) -> list[list[Message]]:
    """Read and validate SFT data; the first bad row is reported with its location and the count of bad rows."""
    columns = columns or {}
    table = read_table(source)
    shape = detect_shape(table, columns)
    examples, problems = [], []
    for row, location in zip(table.rows, table.locations, strict=True):
        try:
            examples.append(row_to_messages(row, shape, columns))
        except RowError as err:
            problems.append(f"{location}: {err}")
    raise_first_problem(problems)
    return examples


def split_train_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic shuffle-and-cut, so the same data and seed always give the same eval split."""
    if not 0 < eval_fraction < 1:
        raise PipelineError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise PipelineError(f"{len(examples)} examples are too few to hold out an eval split; add data "
                            "or pass eval_data")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
