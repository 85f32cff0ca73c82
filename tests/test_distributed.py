"""Real multi-process launches on this CPU: SFT, RM (through `make ... NUM_PROCESSES=2`) and PPO on
2 processes (DDP over gloo), SFT and PPO under
DeepSpeed ZeRO-2 and PPO under ZeRO-3, each compared with the same work on 1 process; the checkpoints reload
as plain models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from common.checkpoint import MANIFEST
from tests.conftest import ROOT, TINY, chat_rows, run_module, write_jsonl
from tests.test_reward_model import preference_rows

ACCELERATE = ROOT / "configs" / "accelerate"


# Every run here, the 1-process baselines included, is on the CPU even on a machine with a GPU: two processes
# cannot share one GPU, and each comparison needs both sides to compute the same way.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def launch(config: str, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           **CPU_ONLY}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
               "--num_processes", "2", "-m", module, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def single(module: str, *args: str) -> subprocess.CompletedProcess:
    result = run_module(module, *args, env=CPU_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def logged(folder: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {row.get("step", row.get("update")): row[key] for row in rows if key in row}


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_base) -> dict[str, Path]:
    """The same 6 SFT steps (inside one epoch) on 1 process x 8 examples, 2 x 4 (DDP) and 2 x 4 (ZeRO-2)."""
    tmp = tmp_path_factory.mktemp("sft")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(64))
    args = ["--config", str(TINY), "--model", str(tiny_base), "--data", str(data), "--max_steps", "6",
            "--logging_steps", "1"]
    single("sft", *args, "--per_device_train_batch_size", "8", "--output_dir", str(tmp / "one"))
    launch("ddp.yaml", "sft", *args, "--per_device_train_batch_size", "4", "--output_dir", str(tmp / "ddp"))
    launch("zero2.yaml", "sft", *args, "--per_device_train_batch_size", "4", "--output_dir", str(tmp / "zero2"))
    return {name: tmp / name for name in ("one", "ddp", "zero2")}


@pytest.mark.parametrize("layout", ["ddp", "zero2"])
def test_sft_on_two_processes_matches_one(sft_runs, layout):
    one, two = manifest(sft_runs["one"])["metrics"], manifest(sft_runs[layout])["metrics"]
    assert two["processes"] == 2 and two["steps"] == one["steps"] == 6
    # Same global batches in the same order: the loss of every step agrees to float precision, which it
    # would not if each process trained its own copy on half the data.
    losses_one, losses_two = logged(sft_runs["one"], "loss"), logged(sft_runs[layout], "loss")
    assert losses_one.keys() == losses_two.keys() and len(losses_one) == 6
    for step, loss in losses_one.items():
        assert losses_two[step] == pytest.approx(loss, rel=1e-4), step
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=2e-3)
    assert two["eval_loss"] < two["base_eval_loss"]
    # One checkpoint, written by the main process, loads as a plain causal LM and generates.
    model = AutoModelForCausalLM.from_pretrained(sft_runs[layout])
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
    assert len(two["samples"]) == 2 and not list(sft_runs[layout].parent.glob(f".{layout}.partial"))


def test_make_sft_and_rm_on_two_processes(tmp_path, tiny_base):
    """`make rm NUM_PROCESSES=2` as a user types it: SFT and RM both launched on 2 processes; the RM matches
    one process trained on the same SFT checkpoint with the same global batch (2 prompts per step)."""
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(64))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(80))
    run = tmp_path / "run"
    result = subprocess.run(["make", "rm", f"CONFIG={TINY}", f"RUN={run}", f"BASE_MODEL={tiny_base}",
                             f"SFT_DATA={chat}", f"PREFS={prefs}", "NUM_PROCESSES=2",
                             "ARGS=--per_device_train_batch_size 1"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **CPU_ONLY})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m sft" in result.stdout
    single("reward_model", "--config", str(TINY), "--model", str(run / "sft"), "--data", str(prefs),
           "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "one"))
    assert manifest(run / "sft")["metrics"]["processes"] == 2
    one, two = manifest(tmp_path / "one")["metrics"], manifest(run / "rm")["metrics"]
    assert two["processes"] == 2 and two["steps"] == one["steps"] == 16
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["eval_accuracy"] == one["eval_accuracy"] > 0.5
    assert two["eval_margin"] == pytest.approx(one["eval_margin"], rel=1e-3)
    model = AutoModelForSequenceClassification.from_pretrained(run / "rm", num_labels=1)
    assert model.config.num_labels == 1


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory, make_run) -> dict[str, Path]:
    """Two PPO updates of 8 episodes (one minibatch, one epoch) on 1 process, 2 (DDP), 2 (ZeRO-2) and 2 (ZeRO-3:
    weights sharded, gathered for sampling and for saving); and on 1 and 2 (DDP) processes training the top
    block only, where learning runs that block from its input kept in scoring (`ppo/top_blocks.py`)."""
    tmp = tmp_path_factory.mktemp("ppo")
    args = ["--config", str(TINY), "--policy", str(make_run / "sft"), "--reward_model", str(make_run / "rm"),
            "--prompts", str(make_run / "data" / "prompts_ppo.jsonl"), "--num_updates", "2", "--ppo_epochs", "1",
            "--rollout_batch_size", "8", "--mini_batch_size", "8", "--micro_batch_size", "2",
            "--generation_batch_size", "4", "--eval_every", "0", "--save_every", "0"]
    top = ["--trainable_layers", "1"]
    single("ppo", *args, "--output_dir", str(tmp / "one"))
    launch("ddp.yaml", "ppo", *args, "--output_dir", str(tmp / "ddp"))
    launch("zero2.yaml", "ppo", *args, "--output_dir", str(tmp / "zero2"))
    launch("zero3.yaml", "ppo", *args, "--output_dir", str(tmp / "zero3"))
    printed = {"one_top": single("ppo", *args, *top, "--output_dir", str(tmp / "one_top")).stdout,
               "ddp_top": launch("ddp.yaml", "ppo", *args, *top, "--output_dir", str(tmp / "ddp_top")).stdout}
    names = ("one", "ddp", "zero2", "zero3", "one_top", "ddp_top")
    return {name: tmp / name for name in names} | {"initial": make_run / "sft", "printed": printed}


@pytest.mark.parametrize("layout", ["ddp", "zero2", "zero3", "ddp_top"])
def test_ppo_on_two_processes_matches_one(ppo_runs, layout):
    baseline = "one_top" if layout == "ddp_top" else "one"
    assert manifest(ppo_runs[layout])["metrics"]["updates"] == 2
    # Rollouts are seeded by global episode number and advantages whitened over the whole batch, so two
    # processes sample, score and learn what one process does.
    for key in ("reward/score", "objective/kl", "loss/value"):
        one, two = logged(ppo_runs[baseline], key), logged(ppo_runs[layout], key)
        assert two == pytest.approx(one, rel=1e-3, abs=1e-5), key
    initial = load_file(ppo_runs["initial"] / "model.safetensors")
    moved = {name: load_file(ppo_runs[name] / "model.safetensors") for name in (baseline, layout)}
    step_one = torch.cat([(moved[baseline][k] - initial[k]).flatten() for k in initial])
    step_two = torch.cat([(moved[layout][k] - initial[k]).flatten() for k in initial])
    assert step_one.norm() > 0
    assert (step_two - step_one).norm() < 1e-3 * step_one.norm()
    if layout == "ddp_top":
        # Both took the kept-input path, and the embeddings and block 0 stayed where they were.
        for name in ("one_top", "ddp_top"):
            assert "learning runs the policy from block 1 and the critic from block 1" in ppo_runs["printed"][name]
        below = [k for k in initial if "embed" in k or ".layers.0." in k]
        assert below and all(torch.equal(moved[layout][k], initial[k]) for k in below)
    # The critic is saved beside the policy and loads as a one-logit classifier.
    critic = AutoModelForSequenceClassification.from_pretrained(ppo_runs[layout] / "value", num_labels=1)
    assert critic.config.num_labels == 1
