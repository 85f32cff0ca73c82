"""Preference data: every accepted shape becomes (prompt messages, chosen reply, rejected reply) pairs.

Accepted shapes (same file types and `columns` mapping as SFT data):
  prompt, chosen, rejected   strings or chat messages; without `prompt`, chosen and rejected are whole
                             dialogues and their shared prefix is the prompt (implicit prompt)
  chosen, rejected (text)    HH-style transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..."; the shared prefix
                             is the prompt
  prompt, responses, ranking a ranking of K responses (indices, best first) -> all K*(K-1)/2 ordered pairs
  prompt, responses, scores  scores of K responses -> pairs whose scores differ by more than `min_margin`
                             (ties and near-ties are dropped)
Optional: `finished` (ranked rows, one bool per response) or `chosen_finished`/`rejected_finished` (pairs)
mark a reply cut off at the length limit (False); the reward model then sees it without an end-of-turn token.
"""

import hashlib
import math
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from common.errors import PipelineError
from common.options import PreferenceDataOptions, data_files
from data.chat import Message, RowError, as_messages, parse_hh_transcript
from data.tables import Table, raise_first_problem, read_table


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float = 0.0  # score difference when the source had scores, else 0
    location: str = ""
    chosen_finished: bool = True
    rejected_finished: bool = True

    def as_row(self) -> dict[str, Any]:
        """trl's conversational preference format."""
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}], "margin": self.margin,
                "chosen_finished": self.chosen_finished, "rejected_finished": self.rejected_finished}

Expanded = list[tuple[list[Message], str, str, float, bool, bool]]  # prompt, chosen, rejected, margin, finished x2


def finished_flag(value: Any, field: str) -> bool:
    if value is None:
        return True
    if isinstance(value, str) and value.lower() in ("true", "false"):  # CSV cells
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise RowError(f"'{field}' must be true or false, got {value!r}")
    return value


def split_dialogue(messages: list[Message], field: str) -> tuple[list[Message], str]:
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"'{field}' must end with an assistant reply")
    return messages[:-1], messages[-1]["content"]


def finite_scores(scores: list[int | float]) -> list[float] | None:
    """The scores as floats, or None if one is NaN, infinite or beyond float range, or two are so far apart that
    their margin is. JSON admits all of these; such a margin would reach the reward model's loss unnoticed."""
    try:
        floats = [float(s) for s in scores]
    except OverflowError:  # an integer beyond float range
        return None
    finite = all(math.isfinite(s) for s in floats) and math.isfinite(max(floats) - min(floats))
    return floats if finite else None


def ranking_pairs(order: list[int], scores: list[float] | None, min_margin: float) -> list[tuple[int, int, float]]:
    """All ordered pairs (better, worse, margin) of response indices from a ranking, best first; near-ties
    dropped when scored."""
    pairs = []
    for better, worse in combinations(order, 2):
        margin = 0.0 if scores is None else scores[better] - scores[worse]
        if scores is not None and margin <= min_margin:
            continue
        pairs.append((better, worse, margin))
    return pairs


def detect_shape(table: Table, name) -> str:
    present = set(table.columns)
    if name("responses") in present and (name("ranking") in present or name("scores") in present):
        return "ranked"
    if name("chosen") in present and name("rejected") in present:
        return "pairwise"
    raise PipelineError(
        f"{table.source}: missing column: found {table.columns}; preference data needs 'chosen' and 'rejected' "
        "(with or without 'prompt'), or 'prompt', 'responses' and 'ranking' or 'scores'; map your names with "
        "columns: {chosen: your_column}"
    )


def pairwise_row(row: dict[str, Any], name) -> Expanded:
    chosen, rejected = row.get(name("chosen")), row.get(name("rejected"))
    flags = (finished_flag(row.get(name("chosen_finished")), name("chosen_finished")),
             finished_flag(row.get(name("rejected_finished")), name("rejected_finished")))
    prompt = row.get(name("prompt"))
    if prompt is not None and prompt != "":
        prompt_messages = as_messages(prompt, name("prompt"), "user")
        return [(prompt_messages, reply_text(chosen, name("chosen")), reply_text(rejected, name("rejected")), 0.0,
                 *flags)]
    chosen_dialogue = dialogue(chosen, name("chosen"))
    rejected_dialogue = dialogue(rejected, name("rejected"))
    prompt_c, chosen_reply = split_dialogue(chosen_dialogue, name("chosen"))
    prompt_r, rejected_reply = split_dialogue(rejected_dialogue, name("rejected"))
    if prompt_c != prompt_r:
        raise RowError("chosen and rejected do not share the same conversation before the last reply; "
                       "give an explicit 'prompt'")
    if not prompt_c:
        raise RowError("no prompt: chosen and rejected hold only a reply; give an explicit 'prompt'")
    return [(prompt_c, chosen_reply, rejected_reply, 0.0, *flags)]


def dialogue(value: Any, field: str) -> list[Message]:
    if isinstance(value, str) and "Human:" in value:
        return parse_hh_transcript(value)
    return as_messages(value, field, "assistant")


def reply_text(value: Any, field: str) -> str:
    messages = as_messages(value, field, "assistant")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(f"'{field}' must be one assistant reply when a prompt is given")
    return messages[0]["content"]


def ranked_row(row: dict[str, Any], name, min_margin: float) -> Expanded:
    prompt = as_messages(row.get(name("prompt")) or "", name("prompt"), "user")
    responses = row.get(name("responses"))
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise RowError(f"'{name('responses')}' must be a list of at least 2 reply strings")
    k = len(responses)
    scores = row.get(name("scores"))
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != k or \
                not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
            raise RowError(f"'{name('scores')}' must be a list of {k} numbers, one per response")
        floats = finite_scores(scores)
        if floats is None:
            raise RowError(f"'{name('scores')}' {scores!r} must be finite numbers (no NaN or Infinity, and margins "
                           "within float range)")
        scores = floats
        order = sorted(range(k), key=lambda i: -scores[i])
    else:
        order = row.get(name("ranking"))
        # Only ints index the responses; a float or a string would pass the sorted() comparison or break it.
        if not isinstance(order, list) or not all(type(i) is int for i in order) or sorted(order) != list(range(k)):
            raise RowError(f"'{name('ranking')}' {order!r} is not a permutation of 0..{k - 1} "
                           "(response indices, best first)")
    finished = row.get(name("finished"))
    if finished is None:
        finished = [True] * k
    elif not isinstance(finished, list) or len(finished) != k:
        raise RowError(f"'{name('finished')}' must be a list of {k} booleans, one per response")
    finished = [finished_flag(flag, name("finished")) for flag in finished]
    return [(prompt, responses[better], responses[worse], margin, finished[better], finished[worse])
            for better, worse, margin in ranking_pairs(order, scores, min_margin)]


def check_pair(prompt: list[Message], chosen: str, rejected: str) -> None:
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise RowError("the prompt is empty")
    if not chosen.strip() or not rejected.strip():
        raise RowError("a response is empty; drop the row or write the response")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen is identical to rejected: the pair teaches nothing; drop it")


def load_preference_pairs(source: str, columns: dict[str, str] | None = None,
                          min_margin: float = 0.0) -> list[PreferencePair]:
    """Read, expand and validate preference data; the first bad row is reported with its location."""
    columns = columns or {}
    table = read_table(source)
    name = lambda key: columns.get(key, key)  # noqa: E731
    shape = detect_shape(table, name)
    pairs, problems = [], []
    for row, location in zip(table.rows, table.locations, strict=True):
        try:
            expanded = ranked_row(row, name, min_margin) if shape == "ranked" else pairwise_row(row, name)
            for prompt, chosen, rejected, margin, chosen_finished, rejected_finished in expanded:
                check_pair(prompt, chosen, rejected)
                pairs.append(PreferencePair(prompt, chosen, rejected, margin, location, chosen_finished,
                                            rejected_finished))
        except RowError as err:
            problems.append(f"{location}: {err}")
    raise_first_problem(problems)
    if not pairs:
        raise PipelineError(f"{source}: no preference pairs left (all ties below min_margin {min_margin}); "
                            "lower min_margin or add data")
    return pairs


def check_prompt_lengths(pairs: list[PreferencePair], tokenizer, max_prompt_length: int) -> None:
    """Prompts longer than the limit would be truncated to nothing useful: say how many and which."""
    # Pairs expanded from one ranked row share its prompt: tokenize each distinct prompt once.
    texts = [tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True) for pair in pairs]
    lengths = {text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in set(texts)}
    too_long = [pair.location for pair, text in zip(pairs, texts, strict=True) if lengths[text] > max_prompt_length]
    if too_long:
        shown = ", ".join(dict.fromkeys(too_long[:3]))
        raise PipelineError(f"{len(too_long)} pair(s) have a prompt longer than {max_prompt_length} tokens "
                            f"(first: {shown}); raise max_prompt_length or shorten those prompts")


def prompt_key(pair: PreferencePair) -> str:
    return "\n".join(f"{m['role']}:{m['content']}" for m in pair.prompt)


def split_preferences(options: PreferenceDataOptions, columns: dict[str, str],
                      seed: int) -> tuple[list[PreferencePair], dict[str, list[PreferencePair]]]:
    """Training pairs (shuffled), and the held-out pairs of each data file (at most max_eval_pairs from each).
    The split depends only on the prompts and the seed: the reward model and DPO hold out the same prompts."""
    pairs = {source: load_preference_pairs(source, columns, options.min_margin) for source in data_files(options.data)}
    if options.eval_data:
        train = [pair for source_pairs in pairs.values() for pair in source_pairs]
        evaluation = {source: load_preference_pairs(source, columns, options.min_margin)
                      for source in data_files(options.eval_data)}
    else:
        # Split by prompt: pairs expanded from one ranking share their prompt and replies, so a pair-level
        # split would let the model see held-out replies in training and inflate the accuracy.
        def held_out(pair: PreferencePair) -> bool:
            digest = hashlib.sha256(f"{seed}:{prompt_key(pair)}".encode()).digest()
            return int.from_bytes(digest[:8]) / 2**64 < options.eval_fraction

        train = [pair for source_pairs in pairs.values() for pair in source_pairs if not held_out(pair)]
        evaluation = {source: [pair for pair in source_pairs if held_out(pair)]
                      for source, source_pairs in pairs.items()}
        empty = [source for source, held in evaluation.items() if not held]
        if not train or empty:
            raise PipelineError(f"{(empty or [options.data])[0]}: too few prompts to hold out "
                                f"{options.eval_fraction:.0%} of them; add data, change eval_fraction or pass "
                                "eval_data")
    random.Random(seed).shuffle(train)
    if options.max_train_pairs:
        train = train[: options.max_train_pairs]
    if options.max_eval_pairs:
        evaluation = {source: held[: options.max_eval_pairs] for source, held in evaluation.items()}
    return train, evaluation
