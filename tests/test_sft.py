"""Stage 1 on the tiny model: the loss falls, checkpoints reload and generate, the manifest says what happened."""

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.checkpoint import MANIFEST, sha256_path
from common.errors import PipelineError, run_cli
from sft.train import main as sft_main
from tests.conftest import (
    TINY,
    chat_rows,
    kill_when,
    one_error_line,
    resumable_checkpoints,
    run_in_process,
    run_module,
    write_jsonl,
)


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
    # From the command line the check comes before torch and the training libraries load (seconds saved
    # each time `make` passes an unchanged stage).
    result = run_module("sft", *args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0 and "is up to date" in result.stdout, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time")}
    assert "common.config" in imported and not imported & {"torch", "trl", "peft", "datasets", "accelerate"}
    assert json.loads((output / MANIFEST).read_text())["finished"] == manifest["finished"]


def test_lora_merged_is_a_plain_model(tmp_path, tiny_base):
    output, _, manifest = train_tiny(tmp_path, tiny_base, "--peft_method", "lora", "--learning_rate", "1e-2")
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
    output, _, manifest = train_tiny(tmp_path, tiny_base, "--peft_method", "lora", "--merge", "false",
                                     "--learning_rate", "1e-2")
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_base.resolve())
    assert manifest["metrics"]["adapter"] is True
    model = AutoModelForCausalLM.from_pretrained(output)  # transformers applies the adapter through peft
    assert any("lora" in name for name in model.state_dict())
    assert isinstance(reply(output), str)


def test_kill_and_rerun_resumes_to_the_same_result(tmp_path, tiny_base, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(80))
    args = ["--config", str(TINY), "--model", str(tiny_base), "--data", str(data), "--max_steps", "24",
            "--save_steps", "4", "--logging_steps", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_in_process("sft", *args, "--output_dir", str(straight)) == 0
    staging = tmp_path / ".resumed.partial"
    kill_when("sft", [*args, "--output_dir", str(resumed)], lambda: len(resumable_checkpoints(staging)) >= 2)
    assert staging.exists() and not resumed.exists()  # killed: nothing looks complete

    capsys.readouterr()
    assert run_in_process("sft", *args, "--output_dir", str(resumed)) == 0
    assert "resuming from" in capsys.readouterr().out
    metrics = json.loads((resumed / MANIFEST).read_text())["metrics"]
    assert metrics["steps"] == 24 and metrics["resumed_from_step"] >= 8
    # Every step is logged once: the steps after the checkpoint ran again and replaced their old rows.
    steps = [row["step"] for row in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
             if "loss" in row]
    assert steps == list(range(1, 25))
    # Weights, optimizer, scheduler, data order and RNG come back: the same run as one without the kill.
    expected = json.loads((straight / MANIFEST).read_text())["metrics"]
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert metrics["base_eval_loss"] == pytest.approx(expected["base_eval_loss"], rel=1e-6)
    assert not staging.exists() and not (resumed / "resume").exists()


def test_diverging_run_stops_with_one_line_and_keeps_no_bad_checkpoint(tmp_path, tiny_base, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    code = run_in_process("sft", "--config", str(TINY), "--model", str(tiny_base), "--data", str(data),
                          "--output_dir", str(tmp_path / "sft"), "--max_steps", "12", "--save_steps", "1",
                          "--learning_rate", "1e30")
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: sft: non-finite") and "training diverged" in line
    assert not (tmp_path / "sft").exists()
    for checkpoint in resumable_checkpoints(tmp_path / ".sft.partial"):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint.name


def test_full_disk_is_reported_before_training(tmp_path, tiny_base, monkeypatch):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(PipelineError, match=r"has 0.0 GiB free, but this stage writes about 0.\d GiB"):
        sft_main(["--config", str(TINY), "--model", str(tiny_base), "--data", str(data),
                  "--output_dir", str(tmp_path / "sft")])
    assert not (tmp_path / "sft").exists() and not (tmp_path / ".sft.partial").exists()


def test_unwritable_output_is_reported_before_training(tmp_path, tiny_base, monkeypatch):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as root, chmod alone would not stop a write
    with pytest.raises(PipelineError, match=f"output folder {tmp_path} is not writable"):
        sft_main(["--config", str(TINY), "--model", str(tiny_base), "--data", str(data),
                  "--output_dir", str(tmp_path / "sft")])
    assert not (tmp_path / ".sft.partial").exists()


def test_disk_full_while_writing_is_one_line(capsys):
    def fill_the_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/.sft.partial/model.safetensors")

    with pytest.raises(SystemExit) as stopped:
        run_cli(fill_the_disk)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot write runs/x/.sft.partial/model.safetensors: No space left on device; free space or fix "
        "permissions, then run again (a stage resumes from its last checkpoint)"]
