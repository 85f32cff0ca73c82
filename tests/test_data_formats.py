"""Every supported SFT file type and row shape loads to the same validated chat messages."""

import csv
import json

import pytest
from datasets import Dataset

from data.chat import load_chat_examples, split_train_eval
from tests.conftest import write_jsonl

DIALOGUE = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]


def test_jsonl_messages(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": DIALOGUE}] * 3)
    assert load_chat_examples(str(path)) == [DIALOGUE] * 3


def test_json_list_with_system_message(tmp_path):
    dialogue = [{"role": "system", "content": "Be brief."}, *DIALOGUE]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": dialogue}]))
    assert load_chat_examples(str(path)) == [dialogue]


def test_csv_prompt_completion(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["Hi there", "Hello! How can I help?"])
    assert load_chat_examples(str(path)) == [DIALOGUE]


def test_csv_messages_as_json_text(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(DIALOGUE)])
    assert load_chat_examples(str(path)) == [DIALOGUE]


def test_parquet_prompt_completion_as_messages(tmp_path):
    path = tmp_path / "d.parquet"
    Dataset.from_list([{"prompt": [DIALOGUE[0]], "completion": [DIALOGUE[1]]}]).to_parquet(str(path))
    assert load_chat_examples(str(path)) == [DIALOGUE]


def test_save_to_disk_folder(tmp_path):
    Dataset.from_list([{"messages": DIALOGUE}]).save_to_disk(str(tmp_path / "saved"))
    assert load_chat_examples(str(tmp_path / "saved")) == [DIALOGUE]


def test_hh_transcript_multi_turn(tmp_path):
    text = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell a joke\n\nAssistant: No."
    path = write_jsonl(tmp_path / "hh.jsonl", [{"text": text}])
    expected = DIALOGUE + [{"role": "user", "content": "Tell a joke"}, {"role": "assistant", "content": "No."}]
    assert load_chat_examples(str(path)) == [expected]


def test_column_mapping_and_sharegpt_roles(tmp_path):
    conversation = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! How can I help?"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": conversation}])
    assert load_chat_examples(str(path), {"messages": "conversations"}) == [DIALOGUE]


def test_eval_split_is_deterministic_and_disjoint():
    examples = list(range(100))
    train, evaluation = split_train_eval(examples, 0.1, seed=3)
    assert len(evaluation) == 10 and sorted(train + evaluation) == examples
    assert split_train_eval(examples, 0.1, seed=3) == (train, evaluation)
    assert split_train_eval(examples, 0.1, seed=4)[1] != evaluation


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_blank_lines_are_not_rows(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps({"messages": DIALOGUE}) + "\n\n")
    else:
        path.write_text("prompt,completion\nHi there,Hello! How can I help?\n")
    assert len(load_chat_examples(str(path))) == 1
