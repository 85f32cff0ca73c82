"""Each broken input gets one line naming the file, the place and the fix, exit code 2, and no output."""

import json
import re

import pytest

from common.errors import PipelineError
from data.chat import load_chat_examples
from tests.conftest import TINY, chat_rows, one_error_line, run_in_process, run_module, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def broken_files(tmp_path):
    """(file, expected message pattern) for each validation error."""
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"messages": [1,\n')
    return {
        "missing column": (write_jsonl(tmp_path / "missing.jsonl", [{"question": "hi", "answer": "yo"}]),
                           r"missing\.jsonl: missing column: found \['answer', 'question'\].*columns"),
        "empty file": (write_jsonl(tmp_path / "empty.jsonl", []), r"empty\.jsonl is empty"),
        "malformed json": (malformed, r"malformed\.jsonl:3:\d+: malformed JSON"),
        "role order": (write_jsonl(tmp_path / "order.jsonl", [GOOD, {"messages": [
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"}]}]),
            r"order\.jsonl:2: message 2 has role 'user' where 'assistant' was expected; roles must alternate"),
        "empty assistant": (write_jsonl(tmp_path / "blank.jsonl", [GOOD, GOOD, {"messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}]),
            r"blank\.jsonl:3: message 2 is an empty assistant turn"),
        "ends on user": (write_jsonl(tmp_path / "ends.jsonl", [{"messages": [{"role": "user", "content": "a"}]}]),
                         r"ends\.jsonl:1: the last message is not an assistant reply"),
        "not hh": (write_jsonl(tmp_path / "text.jsonl", [{"text": "just some prose"}]),
                   r"text\.jsonl:1: text is not an HH transcript"),
        "bad role": (write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "robot", "content": "a"}]}]),
                     r"role\.jsonl:1: message 1 has role 'robot'"),
        "not found": (tmp_path / "nope.jsonl", r"nope\.jsonl: file not found"),
        "unknown type": (write_jsonl(tmp_path / "d.txt", [GOOD]), r"d\.txt: unknown file type '\.txt'"),
    }


@pytest.mark.parametrize("case", ["missing column", "empty file", "malformed json", "role order", "empty assistant",
                                  "ends on user", "not hh", "bad role", "not found", "unknown type"])
def test_validation_error_names_place(tmp_path, case):
    path, pattern = broken_files(tmp_path)[case]
    with pytest.raises(PipelineError, match=pattern):
        load_chat_examples(str(path))


def test_count_of_other_bad_rows(tmp_path):
    bad = {"messages": [{"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, bad, bad])
    with pytest.raises(PipelineError, match=r"d\.jsonl:2: .*\(2 more bad rows\)"):
        load_chat_examples(str(path))


@pytest.mark.parametrize("case", ["malformed json", "role order", "empty assistant"])
def test_cli_exits_with_one_line_and_writes_nothing(tmp_path, tiny_base, case, capsys):
    path, pattern = broken_files(tmp_path)[case]
    output = tmp_path / "run" / "sft"
    code = run_in_process("sft", "--config", str(TINY), "--model", str(tiny_base), "--data", str(path),
                          "--output_dir", str(output))
    assert code == 2 and re.search(pattern, one_error_line(capsys.readouterr().err))
    assert not output.parent.exists()


def test_missing_base_model_is_one_clear_error(tmp_path):
    # The real command line, in a fresh interpreter: one line on stderr and nothing else (no library warning).
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    result = run_module("sft", "--model", str(tmp_path / "no-model"), "--data", str(data),
                        "--output_dir", str(tmp_path / "sft"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and "no-model does not exist; run `make base`" in result.stderr
    assert not (tmp_path / "sft").exists()
