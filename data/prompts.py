"""Prompt files for sampling (preference collection, PPO, evaluation): one prompt per row.

A row holds `prompt` (or the column named by `column`): a string, or chat messages ending with a user turn
(only single-turn prompts are sampled, so the last user message is taken).
"""

from common.errors import PipelineError
from data.chat import RowError, as_messages
from data.tables import raise_first_problem, read_table


def prompt_text(value: object, column: str) -> str:
    if value is None:
        raise RowError(f"no '{column}' field")
    messages = as_messages(value, column, "user")
    if messages[-1]["role"] != "user":
        raise RowError(f"'{column}' must end with a user message")
    text = messages[-1]["content"]
    if not text.strip():
        raise RowError(f"'{column}' is empty")
    return text


def load_prompts(source: str, column: str = "prompt") -> list[str]:
    table = read_table(source)
    if column not in table.columns:
        raise PipelineError(f"{source}: no '{column}' column (found {table.columns}); prompt files hold one "
                            f"prompt per row, e.g. {{\"prompt\": \"How was your day?\"}}")
    prompts, problems = [], []
    for row, location in zip(table.rows, table.locations, strict=True):
        try:
            prompts.append(prompt_text(row.get(column), column))
        except RowError as err:
            problems.append(f"{location}: {err}")
    raise_first_problem(problems)
    return prompts
