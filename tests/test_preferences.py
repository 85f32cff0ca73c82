"""Preference formats, ranking expansion and every validation error."""

import pytest

from common.errors import PipelineError
from data.preferences import check_prompt_lengths, load_preference_pairs
from tests.conftest import write_jsonl

USER = [{"role": "user", "content": "How was your day?"}]


def test_pairwise_strings(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "How was your day?", "chosen": "Great!", "rejected": "Bad."}])
    [pair] = load_preference_pairs(str(path))
    assert (pair.prompt, pair.chosen, pair.rejected) == (USER, "Great!", "Bad.")
    assert pair.as_row()["chosen"] == [{"role": "assistant", "content": "Great!"}]


def test_implicit_prompt_chat(tmp_path):
    row = {"chosen": [*USER, {"role": "assistant", "content": "Great!"}],
           "rejected": [*USER, {"role": "assistant", "content": "Bad."}]}
    [pair] = load_preference_pairs(str(write_jsonl(tmp_path / "p.jsonl", [row])))
    assert (pair.prompt, pair.chosen, pair.rejected) == (USER, "Great!", "Bad.")


def test_hh_transcripts_split_shared_prefix(tmp_path):
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How was your day?"
    row = {"chosen": prefix + "\n\nAssistant: Great!", "rejected": prefix + "\n\nAssistant: Bad."}
    [pair] = load_preference_pairs(str(write_jsonl(tmp_path / "hh.jsonl", [row])))
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("Great!", "Bad.")


def test_ranking_of_four_gives_six_ordered_pairs(tmp_path):
    row = {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}
    pairs = load_preference_pairs(str(write_jsonl(tmp_path / "r.jsonl", [row])))
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"),
                                                      ("a", "b"), ("d", "b")]


def test_scores_drop_ties_and_small_margins(tmp_path):
    row = {"prompt": "q", "responses": ["a", "b", "c", "d"], "scores": [0.9, 0.1, 0.9, 0.5]}
    path = write_jsonl(tmp_path / "s.jsonl", [row])
    pairs = load_preference_pairs(str(path))
    assert len(pairs) == 5 and all(p.margin > 0 for p in pairs)  # the a-c tie is dropped
    wide = load_preference_pairs(str(path), min_margin=0.45)
    assert {(p.chosen, p.rejected) for p in wide} == {("a", "b"), ("c", "b")}


@pytest.mark.parametrize(("row", "pattern"), [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"p\.jsonl:1: chosen is identical to rejected"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, r"p\.jsonl:1: a response is empty"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]},
     r"p\.jsonl:1: 'ranking' \[0, 0, 1\] is not a permutation of 0\.\.2"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, r"'scores' must be a list of 2 numbers"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     r"p\.jsonl:1: no prompt"),
    ({"question": "q", "good": "a"}, r"p\.jsonl: missing column: found \['good', 'question'\]"),
])
def test_validation_errors(tmp_path, row, pattern):
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(PipelineError, match=pattern):
        load_preference_pairs(str(path))


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "How was your day?", "good": "Great!", "bad": "Bad."}])
    [pair] = load_preference_pairs(str(path), {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (pair.prompt, pair.chosen) == (USER, "Great!")


def test_prompt_too_long_names_rows(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    rows = [{"prompt": "short", "chosen": "a", "rejected": "b"},
            {"prompt": "word " * 300, "chosen": "a", "rejected": "b"}]
    pairs = load_preference_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    pattern = r"1 pair\(s\) have a prompt longer than 128 tokens \(first: .*p\.jsonl:2\)"
    with pytest.raises(PipelineError, match=pattern):
        check_prompt_lengths(pairs, tokenizer, 128)
    check_prompt_lengths(pairs[:1], tokenizer, 128)


def test_finished_flags_travel_with_ranked_and_pairwise_rows(tmp_path):
    ranked = {"prompt": "q", "responses": ["a", "b", "c"], "scores": [0.9, 0.5, 0.1], "finished": [True, False, True]}
    pairs = load_preference_pairs(str(write_jsonl(tmp_path / "r.jsonl", [ranked])))
    assert [(p.chosen, p.chosen_finished, p.rejected_finished) for p in pairs] == \
        [("a", True, False), ("a", True, True), ("b", False, True)]
    # Written pairs read back with their flags.
    round_trip = load_preference_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", [p.as_row() for p in pairs])))
    flags = [(p.chosen_finished, p.rejected_finished) for p in round_trip]
    assert flags == [(True, False), (True, True), (False, True)]
    bad = {**ranked, "finished": [True, False]}
    with pytest.raises(PipelineError, match=r"r2.jsonl:1: 'finished' must be a list of 3 booleans"):
        load_preference_pairs(str(write_jsonl(tmp_path / "r2.jsonl", [bad])))
