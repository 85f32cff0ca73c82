"""Other optimisers on the same preferences: DPO and RLOO learn a learnable preference, refuse bad input in one
line, and `make methods` puts PPO, DPO and RLOO side by side in one evaluation report."""

import json
import re
import statistics
import subprocess

import pytest
import torch

from common.checkpoint import MANIFEST
from common.modeling import load_causal_lm, load_tokenizer
from data.preferences import PreferencePair
from dpo.train import tokenized_pairs
from tests.conftest import LOVE_WORDS, REWARD_MODULE, ROOT, TINY, one_error_line, run_in_process, write_jsonl


def love_margin(policy, prompts: list[str]) -> float:
    """Mean log-probability of replying "I love it." minus that of "I hate it." (with EOS) to each prompt."""
    model, tokenizer = load_causal_lm(str(policy)), load_tokenizer(str(policy))
    pairs = [PreferencePair([{"role": "user", "content": p}], "I love it.", "I hate it.") for p in prompts]
    margins = []
    with torch.no_grad():
        for row in tokenized_pairs(pairs, tokenizer):
            totals = []
            for reply in (row["chosen_ids"], row["rejected_ids"]):
                ids = torch.tensor([row["prompt_ids"] + reply])
                logprobs = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
                totals.append(logprobs[len(row["prompt_ids"]) - 1:].sum().item())
            margins.append(totals[0] - totals[1])
    return statistics.fmean(margins)


def love_pairs(n: int) -> list[dict]:
    return [{"prompt": f"what about {LOVE_WORDS[i % 8]} {i}?", "chosen": "I love it.", "rejected": "I hate it."}
            for i in range(n)]


def test_dpo_pairs_end_with_eos_only_where_the_reply_ended(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    pair = PreferencePair([{"role": "user", "content": "hi"}], "done here", "cut off", chosen_finished=True,
                          rejected_finished=False)
    row = tokenized_pairs([pair], tokenizer)[0]
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in row["rejected_ids"]
    assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) == tokenizer.apply_chat_template(
        pair.prompt, tokenize=False, add_generation_prompt=True) + "done here" + tokenizer.eos_token


def test_dpo_learns_the_preference_and_reloads(love_or_hate, tmp_path, capsys):
    sft, prompts = love_or_hate
    data = write_jsonl(tmp_path / "prefs.jsonl", love_pairs(48))
    output = tmp_path / "dpo"
    assert run_in_process("dpo", "--config", str(TINY), "--model", str(sft), "--data", str(data), "--output_dir",
                          str(output), "--max_steps", "12", "--learning_rate", "3e-3") == 0, capsys.readouterr().err
    metrics = json.loads((output / MANIFEST).read_text())["metrics"]
    assert metrics["eval_accuracy"] > 0.9 and metrics["eval_margin"] > 0, metrics
    questions = [f"what about {w}?" for w in LOVE_WORDS]
    assert love_margin(output, questions) > love_margin(sft, questions) + 1.0


def test_rloo_raises_the_reward_of_a_learnable_task(love_or_hate, tmp_path, monkeypatch, capsys):
    sft, prompts = love_or_hate
    (tmp_path / "synthetic_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    output = tmp_path / "rloo"
    # The reward model is only a tokenizer check here: its weight is 0, the synthetic reward is the signal.
    assert run_in_process("rloo", "--config", str(TINY), "--policy", str(sft), "--reward_model", str(sft),
                          "--reward_model_weight", "0", "--extra_rewards", "synthetic_reward:love=1",
                          "--missing_eos_penalty", "0", "--prompts", str(prompts), "--output_dir", str(output),
                          "--max_steps", "16", "--per_device_train_batch_size", "16", "--learning_rate", "3e-4",
                          "--kl_coef", "0.01") == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["score/synthetic_reward:love"] for row in rows if "score/synthetic_reward:love" in row]
    # Not PPO's learning rate: without a clipped ratio (one pass per batch), the push down on the replies that
    # lost spreads a tiny model's probability over the whole vocabulary at 1e-3.
    assert statistics.fmean(rewards[:4]) < 0.6, rewards  # the SFT model does not say "love" every time
    assert statistics.fmean(rewards[-4:]) > statistics.fmean(rewards[:4]) + 0.2, rewards
    manifest = json.loads((output / MANIFEST).read_text())
    assert manifest["metrics"]["episodes"] == 16 * 16 and manifest["stage"] == "rloo"


@pytest.mark.parametrize(("rows", "pattern"), [
    ([{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}], r"bad.jsonl:1: 'ranking'"),
    ([{"prompt": "q", "chosen": "same", "rejected": "same"}], r"bad.jsonl:1: chosen is identical"),
    ([{"prompt": "q", "good": "a", "bad": "b"}], r"bad.jsonl: missing column"),
])
def test_dpo_refuses_bad_preference_data_in_one_line(tiny_base, tmp_path, capsys, rows, pattern):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert run_in_process("dpo", "--config", str(TINY), "--model", str(tiny_base), "--data", str(data),
                          "--output_dir", str(tmp_path / "dpo")) == 2
    assert re.search(pattern, one_error_line(capsys.readouterr().err))
    assert list(tmp_path.iterdir()) == [data]


@pytest.mark.parametrize(("module", "args", "pattern"), [
    ("dpo", ["--loss_type", "sigmoid,nonsense"], r"loss_type 'sigmoid,nonsense': use one or more of sigmoid"),
    ("dpo", ["--peft_method", "prefix"], r"dpo: peft_method prefix is not supported here"),
    ("rloo", ["--num_generations", "1"], r"num_generations must be at least 2"),
    ("rloo", ["--peft_method", "lora", "--trainable_layers", "1"], r"two ways to train fewer weights; choose one"),
    ("ppo", ["--critic_peft_method", "lora", "--trainable_layers", "1"], r"two ways to train fewer weights"),
    ("rloo", ["--per_device_train_batch_size", "6"], r"must be a multiple of num_generations 4"),
])
def test_option_errors_are_one_line(tmp_path, capsys, module, args, pattern):
    assert run_in_process(module, "--config", str(TINY), "--output_dir", str(tmp_path / module), *args) == 2
    assert re.search(pattern, one_error_line(capsys.readouterr().err))
    assert not list(tmp_path.iterdir())


def test_make_methods_reports_every_method(make_run):
    """Runs last on the shared tiny run (its eval gains two rows): the tests that read that eval ran before."""
    result = subprocess.run(["make", "methods", f"CONFIG={TINY}", f"RUN={make_run}"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("dpo", "rloo"):
        manifest = json.loads((make_run / stage / MANIFEST).read_text())
        assert manifest["stage"] == stage and manifest["inputs"]["policy" if stage == "rloo" else "model"][
            "path"].endswith("run/sft")
        assert load_causal_lm(str(make_run / stage)).get_input_embeddings().weight.isfinite().all()
    report = json.loads((make_run / "eval" / "report.json").read_text())
    assert list(report["checkpoints"]) == ["base", "sft", "ppo", "dpo", "rloo"]
    assert {report["checkpoints"][name]["training"]["stage"] for name in ("ppo", "dpo", "rloo")} == {
        "ppo", "dpo", "rloo"}
    assert all(torch.isfinite(torch.tensor(report["checkpoints"][name]["win_gold"]["mean"]))
               for name in ("ppo", "dpo", "rloo"))
    section = (make_run / "eval" / "report.md").read_text().split("## Which method")[1].split("\n## ")[0]
    assert all(f"| {name} | {name.upper()} |" in section for name in ("ppo", "dpo", "rloo")), section
