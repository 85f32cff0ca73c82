"""Shared fixtures: one tiny pipeline run through the Makefile, reused by the tests that inspect it."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from common.precision import Compute

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# What tests that score or sample in-process run under: the CPU in fp32, whatever the machine has.
CPU = Compute(torch.device("cpu"), "fp32")


class ScriptedPolicy(torch.nn.Module):
    """A causal LM whose logits put all their mass on fixed reply tokens, row by row: where replies end is then
    known. A forward from cache position 0 is a new chunk's prompt."""

    def __init__(self, replies: torch.Tensor, vocab_size: int):
        super().__init__()
        self.replies, self.vocab_size = replies, vocab_size
        self.config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        self.first_row, self.rows, self.step = 0, 0, 0

    def forward(self, input_ids, cache_position, **kwargs):
        if cache_position[0] == 0:
            self.first_row, self.rows, self.step = self.first_row + self.rows, len(input_ids), 0
        tokens = self.replies[self.first_row:self.first_row + self.rows, self.step]
        self.step += 1
        logits = torch.full((self.rows, 1, self.vocab_size), -1e4).scatter(2, tokens[:, None, None], 0.0)
        return SimpleNamespace(logits=logits)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    """A learnable toy chat set: whatever the user says, the assistant gives the same cheerful reply."""
    words = ["apple", "river", "stone", "cloud", "tiger", "music", "paper", "green"]
    return [{"messages": [{"role": "user", "content": f"tell me about {words[i % len(words)]}"},
                          {"role": "assistant", "content": "I love that, it is wonderful!"}]} for i in range(n)]


def run_module(module: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=env)


def run_in_process(module: str, *args: str) -> int:
    """`python -m module args` inside the test process: the same entry point, argument parsing and one-line
    error handling (run_cli), without the 8-10 s a new interpreter spends importing torch and transformers.
    Its exit code; read what it printed with capsys. Tests of the real command line use run_module."""
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as ended:
        return ended.code if isinstance(ended.code, int) else int(ended.code is not None)
    finally:
        sys.argv = saved
    return 0


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a refused input prints; asserts there is exactly one and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def kill_when(module: str, args: list[str], ready: Callable[[], bool], timeout: float = 180) -> None:
    """Run a stage and SIGKILL it (no clean-up, as a crash or a lost machine would) once `ready()` holds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert ready(), f"{module} ended or timed out before the moment to kill it"


def resumable_checkpoints(staging: Path) -> list[Path]:
    """Whole trainer checkpoints (trainer_state.json is the last file written) in a partial folder."""
    return [c for c in (staging / "resume").glob("checkpoint-*") if (c / "trainer_state.json").is_file()]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from common.base_model import main

    output = tmp_path_factory.mktemp("base") / "base"
    main(["--config", str(TINY), "--output_dir", str(output)])
    return output


@pytest.fixture(scope="session")
def make_run(tmp_path_factory) -> Path:
    """`make all` on the tiny config: base -> data -> sft -> prefs -> rm -> ppo -> eval, as a user runs it."""
    run = tmp_path_factory.mktemp("make") / "run"
    result = subprocess.run(["make", "all", f"CONFIG={TINY}", f"RUN={run}"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


# A learnable preference: a tiny SFT model that answers "I love it." or "I hate it." about equally often, and a
# reward of 1 for "love" (tests put this module on sys.path as `synthetic_reward`). PPO, RLOO and DPO should all
# shift the policy towards "love" within a few steps.
LOVE_WORDS = ["apple", "river", "stone", "cloud", "tiger", "music", "paper", "green"]
REWARD_MODULE = '''
def love(prompts, replies, finished):
    return [1.0 if "love" in reply else 0.0 for reply in replies]
'''


@pytest.fixture(scope="session")
def love_or_hate(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """The love-or-hate SFT model and its prompt file."""
    from sft.train import main as sft_main

    tmp = tmp_path_factory.mktemp("love")
    rows = [{"messages": [{"role": "user", "content": f"what about {LOVE_WORDS[i % 8]}?"},
                          {"role": "assistant", "content": "I love it." if i % 2 else "I hate it."}]}
            for i in range(64)]
    sft, data = tmp / "sft", write_jsonl(tmp / "sft.jsonl", rows)
    sft_main(["--config", str(TINY), "--model", str(tiny_base), "--data", str(data), "--output_dir", str(sft),
              "--max_steps", "60", "--eval_fraction", "0.1"])
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"what about {w}?"} for w in LOVE_WORDS * 4])
    return sft, prompts
