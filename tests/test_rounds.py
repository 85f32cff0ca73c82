"""Iterated RLHF as a user runs it: `make rounds` on the tiny config after `make all`, one round killed and
resumed; and the pieces of its report (rounds, the distribution-shift table) on hand-made inputs."""

import csv
import json
import os
import signal
import subprocess
import time

import pytest

from common.checkpoint import MANIFEST
from common.errors import PipelineError
from data.annotate import main as annotate_main
from data.collect import CollectConfig, round_prompts
from evaluation.config import parse_rounds
from evaluation.rounds import ranking_outcomes
from tests.conftest import ROOT, TINY


def manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


def ranked_prompts(prefs):
    return {json.loads(line)["prompt"] for line in (prefs / "ranked.jsonl").read_text().splitlines()}


def make(run, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *targets, f"CONFIG={TINY}", f"RUN={run}"], cwd=ROOT, capture_output=True,
                          text=True)


def kill_make_when(arguments: list[str], ready, timeout: float = 600) -> None:
    """SIGKILL make and the stage it runs (its whole process group) once `ready()` holds: a lost machine."""
    process = subprocess.Popen(arguments, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert ready(), "make rounds ended or timed out before the moment to kill it"


def test_make_rounds_chains_rounds_on_fresh_prompts_and_resumes_a_killed_round(make_run):
    # `make rounds ROUNDS=3` killed once round 3's PPO saved a checkpoint, then run again: the work before is
    # kept (every stage up to date), round 3's PPO resumes, and the report covers every round.
    pointer = make_run / "round3" / ".ppo.partial" / "resume" / "latest.json"
    kill_make_when(["make", "rounds", f"CONFIG={TINY}", f"RUN={make_run}", "ROUNDS=3"], pointer.exists)
    assert not (make_run / "round3" / "ppo").exists()
    result = make(make_run, "rounds", "ROUNDS=3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ppo: resuming from" in result.stdout
    assert "round2/ppo is up to date" in result.stdout and "round3/prefs is up to date" in result.stdout
    assert manifest(make_run / "round3" / "ppo")["metrics"]["updates"] == 4

    round2 = make_run / "round2"
    # Each round's manifests name their parents: policy r-1, RM r-1 (warm start), SFT as the KL reference.
    prefs, rm, ppo = (manifest(round2 / stage) for stage in ("prefs", "rm", "ppo"))
    assert prefs["inputs"]["policy"]["path"] == str((make_run / "ppo").resolve())
    assert rm["inputs"]["model"]["path"] == str((make_run / "rm").resolve())
    assert [d["path"] for d in rm["inputs"]["data"]] == [str((make_run / "prefs" / "ranked.jsonl").resolve()),
                                                       str((round2 / "prefs" / "ranked.jsonl").resolve())]
    # The config's round_rm: section lays its options over rm: for rounds 2..N only.
    assert (manifest(make_run / "rm")["config"]["max_steps"], rm["config"]["max_steps"]) == (16, 8)
    by_file = rm["metrics"]["eval_accuracy_by_file"]  # held-out pairs from each round's comparisons
    assert len(by_file) == 2 and all(0.0 <= accuracy <= 1.0 for accuracy in by_file.values())
    assert ppo["inputs"]["policy"]["path"] == str((make_run / "ppo").resolve())
    assert ppo["inputs"]["reference"]["path"] == str((make_run / "sft").resolve())
    assert ppo["inputs"]["reward_model"]["path"] == str((round2 / "rm").resolve())
    assert manifest(make_run / "round3" / "rm")["inputs"]["model"]["path"] == str((round2 / "rm").resolve())
    # Round 2 starts where round 1 ended, already away from its KL reference (SFT); round 1 started on it.
    first_eval = [json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["eval/kl"]
                  for folder in (make_run / "ppo", round2 / "ppo")]
    assert abs(first_eval[0]) < 1e-3 < first_eval[1], first_eval
    # Every round asked its labeller about prompts no other round used, as many as `make prefs` takes.
    prompts = [ranked_prompts(folder / "prefs") for folder in (make_run, round2, make_run / "round3")]
    assert all(len(p) == 24 for p in prompts)
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])

    report = json.loads((make_run / "rounds_eval" / "report.json").read_text())
    assert list(report["rounds"]["rows"]) == ["round1", "round2", "round3"]
    assert all(0.0 <= report["rounds"]["rows"][name]["win_previous"]["mean"] <= 1.0 for name in ("round2", "round3"))
    assert set(report["rounds"]["shift"]) == {"round1", "round2", "round3"}
    assert set(report["rounds"]["shift"]["round3"]) == {"sft", "round1", "round2", "round3"}
    assert {"round2/prefs", "round2/rm", "round2/ppo", "round3/ppo"} <= set(report["stage_seconds"])
    text = (make_run / "rounds_eval" / "report.md").read_text()
    assert "## Rounds" in text and "Distribution shift" in text and "over_optimisation.png" in text
    assert (make_run / "rounds_eval" / "over_optimisation.png").stat().st_size > 0


def test_human_labels_of_a_round_go_out_and_come_back_for_its_reward_model(tmp_path):
    """The human route per round: `make prefs-export/prefs-import ROUND=2`, then round 2's RM trains on
    round2/prefs_human. Checked on make's plan (`make -n`) and a real export and import, training nothing."""
    run, sheet = tmp_path / "run", tmp_path / "r2.csv"
    candidates = run / "round2" / "prefs" / "candidates.jsonl"

    def plan(*targets: str) -> str:
        result = subprocess.run(["make", "-n", *targets, f"CONFIG={TINY}", f"RUN={run}", "ROUND=2",
                                 f"ANNOTATE={sheet}"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert f"--action export --candidates {candidates}" in plan("prefs-export")
    assert f"--output_dir {run}/round2/prefs_human" in plan("prefs-import")
    assert f"{run}/round2/prefs/ranked.jsonl" in plan("round2-rm")
    candidates.parent.mkdir(parents=True)
    candidates.write_text(json.dumps({"prompt": "How are you?", "responses": ["Great!", "Bad.", "Fine."],
                                      "finished": [True, True, True]}) + "\n")
    annotate_main(["--action", "export", "--candidates", str(candidates), "--file", str(sheet)])
    with sheet.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[0]["ranking"] = "1,3,2"
    with sheet.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    annotate_main(["--action", "import", "--candidates", str(candidates), "--file", str(sheet),
                   "--output_dir", str(run / "round2" / "prefs_human")])
    assert f"{run}/round2/prefs_human/ranked.jsonl" in plan("round2-rm")


def test_round_prompts_are_consecutive_blocks_and_refused_when_the_file_runs_out():
    prompts = [f"p{i}" for i in range(10)]
    assert round_prompts(prompts, CollectConfig(num_prompts=4)) == ["p0", "p1", "p2", "p3"]
    assert round_prompts(prompts, CollectConfig(num_prompts=4, round=2)) == ["p4", "p5", "p6", "p7"]
    assert round_prompts(prompts, CollectConfig(num_prompts=0)) == prompts
    with pytest.raises(PipelineError, match="10 prompts, too few for round 3"):
        round_prompts(prompts, CollectConfig(num_prompts=4, round=3))
    with pytest.raises(PipelineError, match="needs num_prompts > 0"):
        round_prompts(prompts, CollectConfig(num_prompts=0, round=2))


def test_ranking_outcomes_count_agreement_with_the_gold_order_and_skip_gold_ties():
    gold = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.55), (2.0, 0.0)]
    rm = [(0.3, 0.1), (0.3, 0.1), (0.0, 9.0), (0.2, 0.2)]
    # agree, reversed, gold tie within the margin (left out), RM tie (half)
    assert ranking_outcomes(gold, rm, min_margin=0.1) == [1.0, 0.0, 0.5]


def test_rounds_option_names_checkpoints_and_their_reward_models():
    checkpoints = {"sft": "a", "round1": "b", "round2": "c"}
    assert parse_rounds("round1=rm1, round2=rm2", checkpoints) == {"round1": "rm1", "round2": "rm2"}
    with pytest.raises(PipelineError, match="name from --checkpoints"):
        parse_rounds("round3=rm3", checkpoints)
    with pytest.raises(PipelineError, match="name=reward_model_folder"):
        parse_rounds("round1", checkpoints)
