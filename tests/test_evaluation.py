"""Evaluation: the protocol's metric functions against hand-computed values, log-probs against a plain forward
pass, and `make eval` end to end on the tiny pipeline (report files, up-to-date skip, user checkpoints, errors)."""

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint import MANIFEST
from common.modeling import load_causal_lm
from evaluation.config import parse_checkpoints
from evaluation.evaluate import reply_logprobs
from evaluation.metrics import bootstrap_interval, distinct_n, sequence_kl, win_outcomes
from tests.conftest import CPU, ROOT, TINY, one_error_line, run_in_process, write_jsonl


def test_win_rate_counts_ties_half():
    outcomes = win_outcomes([0.5, 0.2, -1.0, 0.0], [0.1, 0.2, 0.3, 0.0])
    assert outcomes == [1.0, 0.5, 0.0, 0.5]
    assert sum(outcomes) / len(outcomes) == 0.5


def test_distinct_n_by_hand():
    texts = ["A b a b", "a c"]
    assert distinct_n(texts, 1) == 3 / 6  # a b a b a c: a, b, c unique
    assert distinct_n(texts, 2) == 3 / 4  # (a b) (b a) (a b) (a c)
    assert distinct_n(["one"], 2) == 0.0


def test_sequence_kl_from_known_logprobs():
    policy = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.2, 0.2, 0.2]]))
    reference = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.4, 0.2, 0.2]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # the third token of row 0 is padding: it must not count
    kl = sequence_kl(policy, reference, mask)
    assert kl == pytest.approx([math.log(2), math.log(0.5)])


def test_bootstrap_interval_shape():
    values = [0.0, 1.0] * 20
    low, high = bootstrap_interval(values, resamples=2000, seed=1)
    assert low < 0.5 < high and high - low < 0.4
    narrow = bootstrap_interval(values * 16, resamples=2000, seed=1)
    assert narrow[1] - narrow[0] < (high - low) / 2  # 16x the prompts: about a quarter of the width
    wide = bootstrap_interval(values, resamples=2000, level=0.99, seed=1)
    assert wide[0] <= low and wide[1] >= high
    assert bootstrap_interval([0.3] * 10) == pytest.approx((0.3, 0.3))


def test_checkpoint_list_parsing():
    assert parse_checkpoints("sft=a/sft, mine = b/c ,runs/x/ppo", "sft") == {"sft": "a/sft", "mine": "b/c",
                                                                             "ppo": "runs/x/ppo"}
    with pytest.raises(Exception, match="not among the checkpoints"):
        parse_checkpoints("a=x,b=y", "sft")
    with pytest.raises(Exception, match="twice"):
        parse_checkpoints("sft=x,sft=y", "sft")


def test_reply_logprobs_match_one_unpadded_forward(make_run):
    model = load_causal_lm(str(make_run / "sft"))
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    replies = [[20, 21], [30, 31, 32, 33]]
    logprobs, mask = reply_logprobs(model, prompts, replies, temperature=0.7, batch_size=2, compute=CPU)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    for row, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reply])).logits[0] / 0.7
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, torch.tensor(reply)[:, None])[:, 0]
        assert logprobs[row, : len(reply)] == pytest.approx(expected.tolist(), abs=1e-4)


def read_report(run):
    return json.loads((run / "eval" / "report.json").read_text())


def test_make_all_writes_the_report(make_run):
    report = read_report(make_run)
    rows = report["checkpoints"]
    assert list(rows) == ["base", "sft", "ppo"] and report["reference"] == "sft"
    assert "win_gold" not in rows["sft"] and rows["sft"]["kl"]["mean"] == 0.0
    for name in ("base", "ppo"):
        row = rows[name]
        for key in ("gold", "rm", "win_gold", "win_rm", "kl"):
            assert row[key]["low"] <= row[key]["mean"] <= row[key]["high"], (name, key)
        assert 0 <= row["win_gold"]["mean"] <= 1 and row["perplexity"] > 1
    # PPO moved away from SFT. Its KL estimate on 12 replies of the tiny run is noise around a small KL (it
    # may be below 0: a sample mean of log-ratios), so the moved weights show it; the estimate's interval may
    # not lie below 0.
    assert rows["ppo"]["kl"]["high"] > 0
    sft, ppo = (load_file(make_run / name / "model.safetensors") for name in ("sft", "ppo"))
    assert any(not torch.equal(sft[key], ppo[key]) for key in sft)
    assert report["rm_heldout_accuracy"] is not None
    assert list(report["stage_seconds"]) == ["base", "data", "sft", "prefs", "rm", "ppo"]  # in the order they ran
    folder = make_run / "eval"
    for png in ("score_distributions.png", "ppo_training.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (folder / "report.md").read_text()
    assert "| checkpoint | judge score | win rate vs sft (judge)" in markdown
    assert "![ppo training](ppo_training.png)" in markdown and "## Cost" in markdown
    replies = [json.loads(line) for line in (folder / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == report["num_prompts"] == 12
    assert markdown.count(replies[0]["prompt"]) >= 1 and {"base", "sft", "ppo"} <= set(replies[0])
    assert json.loads((folder / MANIFEST).read_text())["stage"] == "eval"


def test_user_checkpoints_and_prompts(make_run, tmp_path):
    prompts = write_jsonl(tmp_path / "mine.jsonl", [{"question": f"how is the weather on day {i}?"} for i in range(5)])
    output = tmp_path / "eval"
    result = subprocess.run(["make", "eval", f"CONFIG={TINY}", f"RUN={tmp_path / 'unused'}",
                             f"CHECKPOINTS=sft={make_run / 'sft'},mine={make_run / 'ppo'}", f"EVAL_PROMPTS={prompts}",
                             f"ARGS=--prompt_column question --output_dir {output}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((output / "report.json").read_text())
    assert list(report["checkpoints"]) == ["sft", "mine"] and report["num_prompts"] == 5
    # No run folder: no reward model and no SFT eval set, so those columns are left out, not invented.
    assert report["checkpoints"]["mine"]["rm"] is None and report["checkpoints"]["mine"]["perplexity"] is None
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("case, pattern", [
    ("missing", "model {missing} does not exist"),
    ("empty", "{empty}"),
    ("judge", "cannot import module 'no_such_module'"),
])
def test_bad_input_is_one_line_and_writes_nothing(make_run, tmp_path, case, pattern, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    missing = tmp_path / "no_such_checkpoint"
    args = {"checkpoints": f"sft={make_run / 'sft'}", "prompts": str(make_run / "data" / "prompts_eval.jsonl"),
            "judge": "data.judges:gold_judge"}
    args.update({"missing": {"checkpoints": f"sft={make_run / 'sft'},mine={missing}"}, "empty": {"prompts": str(empty)},
                 "judge": {"judge": "no_such_module:judge"}}[case])
    output = tmp_path / "eval"
    code = run_in_process("evaluation", "--config", str(TINY), "--output_dir", str(output), "--reward_model", "",
                          *[item for key, value in args.items() for item in (f"--{key}", value)])
    assert code == 2 and pattern.format(missing=missing, empty=empty) in one_error_line(capsys.readouterr().err)
    assert not output.exists() and not (tmp_path / ".eval.partial").exists()
