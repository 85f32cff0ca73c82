"""Preference collection (`make prefs`) with each kind of labeller, and the human export/import round trip."""

import csv
import json

import pytest

from common.checkpoint import MANIFEST
from common.errors import PipelineError
from common.precision import Compute
from common.reward import RewardScorer
from data.annotate import main as annotate_main
from data.collect import main as collect_main
from tests.conftest import TINY, run_module


def by_length(prompts: list[str], replies: list[str], finished: list[bool]) -> list[float]:
    """A callable labeller for the tests: longer is better."""
    return [float(len(reply)) for reply in replies]


def wrong_count(prompts: list[str], replies: list[str], finished: list[bool]) -> list[float]:
    return [1.0]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def collect(make_run, output, *extra: str) -> None:
    collect_main(["--config", str(TINY), "--policy", str(make_run / "sft"), "--prompts",
                  str(make_run / "data" / "prompts_prefs.jsonl"), "--output_dir", str(output), *extra])


def test_make_prefs_samples_k_replies_and_expands_rankings(make_run):
    ranked = read_jsonl(make_run / "prefs" / "ranked.jsonl")
    manifest = json.loads((make_run / "prefs" / MANIFEST).read_text())
    assert len(ranked) == manifest["metrics"]["prompts"] == 24
    assert all(len(row["responses"]) == len(row["scores"]) == len(row["finished"]) == 4 for row in ranked)
    pairs = read_jsonl(make_run / "prefs" / "pairs.jsonl")
    assert len(pairs) == manifest["metrics"]["pairs"] <= 24 * 6
    by_prompt = {row["prompt"]: row for row in ranked}
    for pair in pairs[:20]:  # every pair agrees with its row's scores
        row = by_prompt[pair["prompt"][0]["content"]]
        score = dict(zip(row["responses"], row["scores"], strict=True))
        assert score[pair["chosen"][0]["content"]] > score[pair["rejected"][0]["content"]]


def test_callable_labeller(make_run, tmp_path):
    collect(make_run, tmp_path / "prefs", "--labeller", "tests.test_collect:by_length", "--num_prompts", "4")
    for row in read_jsonl(tmp_path / "prefs" / "ranked.jsonl"):
        assert row["scores"] == [float(len(reply)) for reply in row["responses"]]
    for pair in read_jsonl(tmp_path / "prefs" / "pairs.jsonl"):
        assert len(pair["chosen"][0]["content"]) > len(pair["rejected"][0]["content"])


def test_reward_model_labeller(make_run, tmp_path):
    collect(make_run, tmp_path / "prefs", "--labeller", str(make_run / "rm"), "--num_prompts", "3")
    ranked = read_jsonl(tmp_path / "prefs" / "ranked.jsonl")
    scorer = RewardScorer.load(str(make_run / "rm"), Compute.choose("fp32"))  # the tiny config pins fp32
    expected = scorer.judge([ranked[0]["prompt"]] * 4, ranked[0]["responses"], ranked[0]["finished"])
    assert ranked[0]["scores"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("labeller", "pattern"), [
    ("tests.test_collect:wrong_count", r"returned 1 scores for 8 replies"),
    ("no_such_module:judge", r"cannot import module 'no_such_module'"),
    ("tests.test_collect", r"not a callable spec"),
])
def test_labeller_errors(make_run, tmp_path, labeller, pattern):
    with pytest.raises(PipelineError, match=pattern):
        collect(make_run, tmp_path / "prefs", "--labeller", labeller, "--num_prompts", "2")
    assert not (tmp_path / "prefs").exists()


def test_empty_prompt_file_is_refused(make_run, tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    result = run_module("data.collect", "--config", str(TINY), "--policy", str(make_run / "sft"), "--prompts",
                        str(empty), "--output_dir", str(tmp_path / "prefs"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: {empty} is empty: it holds no rows; add " \
                                                               "examples or pass another file"
    assert not (tmp_path / "prefs").exists()


def annotate(make_run, *args: str) -> None:
    annotate_main(["--candidates", str(make_run / "prefs" / "candidates.jsonl"), *args])


def test_export_edit_import_round_trip_csv(make_run, tmp_path):
    sheet = tmp_path / "to_rank.csv"
    annotate(make_run, "--action", "export", "--file", str(sheet))
    with sheet.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24 and rows[0]["ranking"] == "" and rows[0]["response_4"] is not None
    rows[0]["ranking"], rows[1]["ranking"] = "4,2,1,3", " 1, 2, 3, 4"  # the rest stay unranked
    with sheet.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    annotate(make_run, "--action", "import", "--file", str(sheet), "--output_dir", str(tmp_path / "human"))
    ranked = read_jsonl(tmp_path / "human" / "ranked.jsonl")
    assert [row["ranking"] for row in ranked] == [[3, 1, 0, 2], [0, 1, 2, 3]]
    pairs = read_jsonl(tmp_path / "human" / "pairs.jsonl")
    distinct = [len(set(row["responses"])) for row in ranked]
    assert len(pairs) == sum(k * (k - 1) // 2 for k in distinct)
    first = ranked[0]["responses"]
    assert pairs[0]["chosen"][0]["content"] == first[3] and pairs[0]["rejected"][0]["content"] == first[1]
    assert json.loads((tmp_path / "human" / MANIFEST).read_text())["metrics"]["prompts"] == 2


@pytest.mark.parametrize(("edit", "pattern"), [
    ({"ranking": [1, 1, 2, 3]}, r"to_rank.jsonl:2: ranking \[1, 1, 2, 3\] must list each of the response numbers"),
    ({"ranking": "first"}, r"to_rank.jsonl:2: ranking 'first' is not a list of response numbers"),
    ({"prompt": "something else", "ranking": [1, 2, 3, 4]}, r"to_rank.jsonl:2: prompt or responses differ"),
    ({"id": 999, "ranking": [1, 2, 3, 4]}, r"to_rank.jsonl:2: id 999 is not one of the exported ids"),
])
def test_malformed_import_is_refused_with_the_row(make_run, tmp_path, edit, pattern):
    sheet = tmp_path / "to_rank.jsonl"
    annotate(make_run, "--action", "export", "--file", str(sheet))
    rows = read_jsonl(sheet)
    rows[0]["ranking"] = [2, 1, 3, 4]
    rows[1].update(edit)
    sheet.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(PipelineError, match=pattern):
        annotate(make_run, "--action", "import", "--file", str(sheet), "--output_dir", str(tmp_path / "human"))
    assert not (tmp_path / "human").exists() and not (tmp_path / ".human.partial").exists()
