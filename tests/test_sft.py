"""Stage 1 on the tiny model: the loss falls, checkpoints reload and generate, the manifest says what happened."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.checkpoint import MANIFEST, sha256_path
from sft.train import main as sft_main
from tests.conftest import ROOT, TINY, chat_rows, write_jsonl


def train_tiny(tmp_path, tiny_base, *extra: str, steps: int = 15):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(80))
    output = tmp_path / "sft"
    sft_main(["--config", str(TINY), "--model", str(tiny_base), "--data", str(data), "--output_dir", str(output),
              "--max_steps", str(steps), *extra])
    return output, data, json.loads((output / MANIFEST).read_text())


def reply(folder, prompt="tell me about rain") -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_base):
    return train_tiny(tmp_path_factory.mktemp("full"), tiny_base, steps=25)


def test_eval_loss_falls_and_checkpoint_reloads(full_run):
    output, _, manifest = full_run
    metrics = manifest["metrics"]
    assert metrics["eval_loss"] < metrics["base_eval_loss"] - 0.5
    assert metrics["steps"] == 25
    assert (output / "model.safetensors").is_file() and not (output / "adapter_config.json").exists()
    assert reply(output).startswith("I love")  # the learned reply, through plain from_pretrained


def test_metrics_are_logged(full_run):
    output, _, _ = full_run
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert any("eval_loss" in line for line in lines)
    assert list((output / "tensorboard").rglob("events.out.tfevents.*"))


def test_manifest_contents(full_run, tiny_base):
    output, data, manifest = full_run
    assert manifest["stage"] == "sft"
    assert manifest["inputs"]["data"] == {"path": str(data.resolve()), "sha256": sha256_path(data)}
    assert manifest["inputs"]["model"]["manifest_sha256"] == sha256_path(tiny_base / MANIFEST)
    assert manifest["config"]["max_steps"] == 25 and manifest["config"]["learning_rate"] == 3e-3
    assert {"torch", "transformers", "trl", "peft", "datasets", "accelerate"} <= set(manifest["versions"])
    assert manifest["started"] <= manifest["finished"] and manifest["seconds"] > 0
    assert len(manifest["metrics"]["samples"]) == 2


def test_rerun_with_same_inputs_is_skipped(full_run, tiny_base, capsys):
    output, data, manifest = full_run
    args = ["--config", str(TINY), "--model", str(tiny_base), "--data", str(data), "--output_dir", str(output),
            "--max_steps", "25"]
    sft_main(args)
    assert "up to date" in capsys.readouterr().out
    assert json.loads((output / MANIFEST).read_text())["finished"] == manifest["finished"]


def test_lora_merged_is_a_plain_model(tmp_path, tiny_base):
    output, _, manifest = train_tiny(tmp_path, tiny_base, "--use_lora", "true", "--learning_rate", "1e-2")
    assert not (output / "adapter_config.json").exists()
    assert manifest["metrics"]["adapter"] is False
    assert manifest["metrics"]["eval_loss"] < manifest["metrics"]["base_eval_loss"]
    merged = AutoModelForCausalLM.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert not any("lora" in name for name in merged.state_dict())
    changed = [name for name, weight in merged.state_dict().items()
               if not torch.equal(weight, base.state_dict()[name])]
    assert changed  # the adapter's update landed in the base weights


def test_lora_unmerged_keeps_adapter_with_base_recorded(tmp_path, tiny_base):
    output, _, manifest = train_tiny(tmp_path, tiny_base, "--use_lora", "true", "--merge", "false",
                                     "--learning_rate", "1e-2")
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_base.resolve())
    assert manifest["metrics"]["adapter"] is True
    model = AutoModelForCausalLM.from_pretrained(output)  # transformers applies the adapter through peft
    assert any("lora" in name for name in model.state_dict())
    assert isinstance(reply(output), str)


def test_kill_leaves_nothing_complete_and_rerun_trains(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(80))
    output = tmp_path / "sft"
    args = [sys.executable, "-m", "sft", "--config", str(TINY), "--model", str(tiny_base), "--data", str(data),
            "--output_dir", str(output)]
    process = subprocess.Popen([*args, "--max_steps", "400"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    staging = tmp_path / ".sft.partial"
    deadline = time.time() + 120
    while not (staging / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert staging.exists() and not output.exists()
    rerun = subprocess.run([*args, "--max_steps", "4"], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((output / MANIFEST).read_text())["metrics"]["steps"] == 4
    assert not staging.exists()
