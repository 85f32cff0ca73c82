"""The Makefile as a user runs it: `make all` on the tiny config builds base -> data -> sft -> prefs -> rm -> ppo
-> eval."""

import json
import os
import subprocess

from common.checkpoint import MANIFEST
from data.chat import load_chat_examples
from tests.conftest import ROOT, TINY, chat_rows, write_jsonl


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_all_chains_every_stage(make_run):
    for stage in ("base", "data", "sft", "prefs", "rm", "ppo", "eval"):
        assert json.loads((make_run / stage / MANIFEST).read_text())["stage"] == stage
    sft = json.loads((make_run / "sft" / MANIFEST).read_text())
    assert sft["inputs"]["eval_data"]["path"].endswith("data/sft_eval.jsonl")
    assert sft["metrics"]["eval_loss"] < sft["metrics"]["base_eval_loss"]
    rm = json.loads((make_run / "rm" / MANIFEST).read_text())
    assert rm["inputs"]["data"]["path"].endswith("prefs/ranked.jsonl")
    assert rm["inputs"]["model"]["path"].endswith("run/sft")
    assert {"eval_accuracy", "reward_mean", "reward_std"} <= set(rm["metrics"])
    ppo = json.loads((make_run / "ppo" / MANIFEST).read_text())
    assert ppo["inputs"]["reward_model"]["path"].endswith("run/rm")
    assert ppo["inputs"]["prompts"]["path"].endswith("data/prompts_ppo.jsonl")
    assert not list(make_run.glob(".*.partial"))


def test_bundled_splits_are_valid_and_disjoint(make_run):
    data = make_run / "data"
    train = load_chat_examples(str(data / "sft_train.jsonl"))
    evaluation = load_chat_examples(str(data / "sft_eval.jsonl"))
    assert len(train) > 10 * len(evaluation) > 0
    prompts = {name: {row["prompt"] for row in read_jsonl(data / f"prompts_{name}.jsonl")}
               for name in ("prefs", "ppo", "eval")}
    assert all(len(p) > 100 for p in prompts.values())
    assert not (prompts["prefs"] & prompts["ppo"]) and not (prompts["ppo"] & prompts["eval"])
    assert not (prompts["prefs"] & prompts["eval"])
    sft_text = {m["content"] for example in train + evaluation for m in example}
    assert not (prompts["eval"] & sft_text)


def test_second_make_skips_unchanged_stages(make_run):
    stages = ("base", "data", "sft", "prefs", "rm", "ppo", "eval")
    before = {stage: (make_run / stage / MANIFEST).read_text() for stage in stages}
    result = subprocess.run(["make", "rm", f"CONFIG={TINY}", f"RUN={make_run}", "ARGS=--no_such_option 1"],
                            cwd=ROOT, capture_output=True, text=True)
    # ARGS reach only the stage named on the command line: rm refuses the option, the others never see it.
    assert result.returncode != 0 and "unknown command-line argument(s): --no_such_option" in result.stderr
    for stage in ("sft", "prefs"):
        assert f"{stage}: " in result.stdout and "is up to date" in result.stdout
    result = subprocess.run(["make", "eval", f"CONFIG={TINY}", f"RUN={make_run}"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("is up to date") == len(stages), result.stdout
    # Each stage finds its output up to date before torch loads: passing the whole chain costs seconds.
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time")}
    assert "common.checkpoint" in imported and "torch" not in imported
    # A skipped evaluation still prints its headline, so a rerun of `make all` ends with the result.
    assert "ppo vs sft under the judge: win rate" in result.stdout
    assert {stage: (make_run / stage / MANIFEST).read_text() for stage in stages} == before


def test_make_rm_with_user_model_chat_data_and_preferences(make_run, tmp_path):
    """`make rm` with the user's base model, SFT data and preferences: no embedded stage is built."""
    prefix = "\n\nHuman: what do you think of the {}?"
    rows = [{"chosen": prefix.format(i) + "\n\nAssistant: I love it!",
             "rejected": prefix.format(i) + "\n\nAssistant: I hate it."} for i in range(30)]
    prefs = write_jsonl(tmp_path / "hh.jsonl", rows)
    chat = write_jsonl(tmp_path / "mine.jsonl", chat_rows(48))
    run = tmp_path / "run"
    result = subprocess.run(["make", "rm", f"CONFIG={TINY}", f"RUN={run}", f"PREFS={prefs}",
                             f"BASE_MODEL={make_run / 'base'}", f"SFT_DATA={chat}", "ARGS=--max_steps 3"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((run / "rm" / MANIFEST).read_text())
    assert manifest["inputs"]["data"]["path"] == str(prefs.resolve()) and manifest["metrics"]["steps"] == 3
    sft = json.loads((run / "sft" / MANIFEST).read_text())
    assert sft["metrics"]["steps"] == 12  # ARGS went to rm only
    # The embedded eval split is not mixed in: SFT holds out a share of the user's own data instead.
    assert sft["inputs"]["data"]["path"] == str(chat.resolve()) and "eval_data" not in sft["inputs"]
    assert not any((run / folder).exists() for folder in ("base", "data", "prefs"))
