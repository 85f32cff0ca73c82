"""Stage 2 on the tiny model: a learnable synthetic preference, every data shape, LoRA, errors, scoring."""

import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from common.checkpoint import MANIFEST
from common.errors import PipelineError
from common.reward import RewardScorer, reward_input_ids
from data.preferences import PreferencePair
from reward_model.grouped import GroupCollator, grouped_loss, tokenize_groups
from reward_model.score import main as score_main
from reward_model.train import main as rm_main
from tests.conftest import CPU, TINY, kill_when, resumable_checkpoints, run_in_process, run_module, write_jsonl

TOPICS = ["apple", "river", "stone", "cloud", "tiger", "music", "paper", "green", "ocean", "train", "bread",
          "chair", "snow", "lamp", "garden", "clock", "horse", "bridge", "candle", "forest"]
GOOD = ["I love it, it is wonderful!", "That is great, I am so happy.", "Lovely, thank you, this is amazing!"]
BAD = ["I hate it, it is awful.", "That is terrible, I am so sad.", "Horrible, this is the worst."]


def preference_rows(n: int = 80) -> list[dict]:
    """Learnable: the cheerful reply always beats the gloomy one, whatever the prompt."""
    return [{"prompt": f"what do you think of the {TOPICS[i % len(TOPICS)]} number {i}?",
             "chosen": GOOD[i % 3], "rejected": BAD[(i // 3) % 3]} for i in range(n)]


def train_rm(tmp_path, tiny_base, data, *extra: str) -> tuple:
    output = tmp_path / "rm"
    rm_main(["--config", str(TINY), "--model", str(tiny_base), "--data", str(data), "--output_dir", str(output),
             *extra])
    return output, json.loads((output / MANIFEST).read_text())


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "prefs.jsonl", preference_rows())
    return train_rm(tmp, tiny_base, data, "--max_steps", "30")


def test_held_out_accuracy_beats_chance_and_stats_are_stored(learned):
    _, manifest = learned
    metrics = manifest["metrics"]
    assert metrics["eval_pairs"] >= 10
    assert metrics["eval_accuracy"] >= 0.8
    assert metrics["eval_chosen_mean"] > metrics["eval_rejected_mean"]
    assert metrics["reward_std"] > 0 and metrics["reward_stat_replies"] > 0
    assert manifest["stage"] == "rm" and manifest["inputs"]["model"]["path"]


def test_reloads_with_plain_transformers_and_scores_at_the_last_token(learned):
    output, _ = learned
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id != tokenizer.eos_token_id
    prompt = [{"role": "user", "content": "what do you think of the moon?"}]
    good, bad = (reward_input_ids(tokenizer, prompt, reply) for reply in ("I love it, it is wonderful!",
                                                                         "I hate it, it is awful."))
    with torch.no_grad():
        scores = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in (good, bad)]
    assert scores[0] > scores[1]
    # Batched, right-padded scoring reads each row at its own last token: same scores as one at a time.
    batched = RewardScorer.load(str(output), CPU).score_ids([good, bad])
    assert batched == pytest.approx(scores, abs=1e-4)


def test_metrics_are_logged(learned):
    output, _ = learned
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert any("eval_accuracy" in line for line in lines)
    assert list((output / "tensorboard").rglob("events.out.tfevents.*"))


HH_PREFIX = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: what do you think of the {}?"


@pytest.mark.parametrize("shape", ["pairwise", "chat", "hh", "ranked"])
def test_every_preference_shape_trains(tmp_path, tiny_base, shape):
    rows = preference_rows(24)
    if shape == "chat":
        rows = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["rejected"]}]} for r in rows]
    elif shape == "hh":
        rows = [{"chosen": HH_PREFIX.format(i) + f"\n\nAssistant: {r['chosen']}",
                 "rejected": HH_PREFIX.format(i) + f"\n\nAssistant: {r['rejected']}"} for i, r in enumerate(rows)]
    elif shape == "ranked":
        rows = [{"prompt": r["prompt"], "responses": [r["rejected"], "Okay.", r["chosen"]], "ranking": [2, 1, 0]}
                for r in rows]
    data = write_jsonl(tmp_path / f"{shape}.jsonl", rows)
    _, manifest = train_rm(tmp_path, tiny_base, data, "--max_steps", "2")
    per_row = 3 if shape == "ranked" else 1
    assert manifest["metrics"]["train_pairs"] + manifest["metrics"]["eval_pairs"] == 24 * per_row
    assert manifest["metrics"]["steps"] == 2


@pytest.mark.parametrize(("rows", "extra", "pattern"), [
    ([{"prompt": "q", "good": "a", "bad": "b"}], [], r"missing column"),
    ([{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}], [], r"bad.jsonl:1: 'ranking'"),
    ([{"prompt": "q", "chosen": "same", "rejected": "same"}], [], r"bad.jsonl:1: chosen is identical"),
    ([{"prompt": "q", "chosen": "", "rejected": "b"}], [], r"bad.jsonl:1: a response is empty"),
    (preference_rows(8), ["--max_length", "12"], r"8 pair\(s\) have a prompt longer than 11 tokens"),
    (preference_rows(2), [], r"too few prompts to hold out"),
])
def test_bad_preference_data_is_refused_before_any_output(tmp_path, tiny_base, rows, extra, pattern):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PipelineError, match=pattern):
        train_rm(tmp_path, tiny_base, data, *extra)
    assert not (tmp_path / "rm").exists() and not (tmp_path / ".rm.partial").exists()


def test_cli_error_is_one_line_and_nonzero(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    result = run_module("reward_model", "--config", str(TINY), "--model", str(tiny_base), "--data", str(data),
                        "--output_dir", str(tmp_path / "rm"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {data}:1: chosen is identical to rejected: the pair "
                                                  "teaches nothing; drop it"]
    assert not (tmp_path / "rm").exists()


def test_lora_adapter_reloads_and_scores(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    output, manifest = train_rm(tmp_path, tiny_base, data, "--max_steps", "4", "--peft_method", "lora",
                                "--merge", "false", "--lora_r", "4")
    assert (output / "adapter_config.json").is_file() and manifest["metrics"]["adapter"]
    # The adapter records its base (the SFT causal LM); its one-logit head needs num_labels=1 on loading.
    model = AutoModelForSequenceClassification.from_pretrained(output, num_labels=1)
    assert model.config.num_labels == 1
    assert len(RewardScorer.load(str(output), CPU).judge(["hi"], ["hello"], [True])) == 1


def test_score_tool_scores_replies_and_pairs(tmp_path, learned):
    output, _ = learned
    replies = write_jsonl(tmp_path / "replies.jsonl", [
        {"prompt": "what do you think of the sea?", "response": "I love it, it is wonderful!"},
        {"prompt": "what do you think of the sea?", "response": "I hate it, it is awful.", "finished": False}])
    score_main(["--model", str(output), "--data", str(replies)])
    scored = [json.loads(line) for line in (tmp_path / "replies.scores.jsonl").read_text().splitlines()]
    assert scored[0]["score"] > scored[1]["score"] and scored[1]["finished"] is False

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(6))
    result = run_module("reward_model.score", "--model", str(output), "--data", str(pairs), "--output",
                        str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy 1.000" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(row["chosen_score"] > row["rejected_score"] for row in rows)


def test_score_tool_errors(tmp_path, learned):
    output, _ = learned
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": ""}, {"prompt": "q"}])
    with pytest.raises(PipelineError, match=r"bad.jsonl:1: .*\(1 more bad rows\)"):
        score_main(["--model", str(output), "--data", str(bad)])
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "response": "fine"}])
    with pytest.raises(PipelineError, match=r"missing does not exist"):
        score_main(["--model", str(tmp_path / "missing"), "--data", str(good)])
    assert not list(tmp_path.glob("*.scores.jsonl*"))


def test_trainable_layers_freeze_the_lower_blocks(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    output, _ = train_rm(tmp_path, tiny_base, data, "--max_steps", "3", "--trainable_layers", "1",
                         "--head_learning_rate", "1e-2")
    before = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(output).state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(before[name], after[name])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(PipelineError, match=r"trainable_layers must be from 1 to 2"):
        train_rm(tmp_path / "bad", tiny_base, data, "--trainable_layers", "5")
    with pytest.raises(PipelineError, match=r"choose one"):
        train_rm(tmp_path / "bad", tiny_base, data, "--trainable_layers", "1", "--peft_method", "lora")


def test_a_ranking_is_one_group_each_reply_scored_once_and_the_loss_averages_its_pairs(tiny_base):
    prompt = [{"role": "user", "content": "hi"}]
    replies = ["best", "good", "fine", "bad"]
    pairs = [PreferencePair(prompt, replies[i], replies[j], float(j - i), "x", True, True)
             for i in range(4) for j in range(i + 1, 4)]
    other = PreferencePair([{"role": "user", "content": "yo"}], "up", "down", 1.0, "y", True, True)
    dataset = tokenize_groups(pairs + [other], AutoTokenizer.from_pretrained(tiny_base), 64, "train")
    assert len(dataset) == 2
    assert len(dataset[0]["sequences"]) == 4 and len(dataset[0]["better"]) == 6  # K=4: 4 replies, 6 pairs
    batch = GroupCollator(pad_token_id=0)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 6  # each distinct reply once: 4 + 2
    rewards = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.5, 0.0])
    # Each prompt counts the same: the mean of its pairs' losses, then the mean over the two prompts.
    first = statistics.fmean(-math.log(1 / (1 + math.exp(i - j))) for i in range(4) for j in range(i + 1, 4))
    second = -math.log(1 / (1 + math.exp(-0.5)))
    assert math.isclose(grouped_loss(rewards, batch, use_margin=False).item(), (first + second) / 2, rel_tol=1e-5)
    # With margins the differences shrink by each pair's margin (here j - i, and 1.0 for the second prompt).
    with_margin = statistics.fmean(-math.log(1 / (1 + math.exp(0))) for _ in range(6))
    second_margin = -math.log(1 / (1 + math.exp(0.5)))
    assert math.isclose(grouped_loss(rewards, batch, use_margin=True).item(), (with_margin + second_margin) / 2,
                        rel_tol=1e-5)


def test_kill_and_rerun_resumes_to_the_same_result(tmp_path, tiny_base, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(80))
    args = ["--config", str(TINY), "--model", str(tiny_base), "--data", str(data), "--max_steps", "20",
            "--save_steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_in_process("reward_model", *args, "--output_dir", str(straight)) == 0
    staging = tmp_path / ".resumed.partial"
    kill_when("reward_model", [*args, "--output_dir", str(resumed)], lambda: len(resumable_checkpoints(staging)) >= 2)
    assert staging.exists() and not resumed.exists()

    capsys.readouterr()
    assert run_in_process("reward_model", *args, "--output_dir", str(resumed)) == 0
    assert "resuming from" in capsys.readouterr().out
    metrics = json.loads((resumed / MANIFEST).read_text())["metrics"]
    expected = json.loads((straight / MANIFEST).read_text())["metrics"]
    assert metrics["steps"] == 20 and metrics["resumed_from_step"] >= 8
    assert metrics["eval_accuracy"] == expected["eval_accuracy"]
    assert metrics["eval_margin"] == pytest.approx(expected["eval_margin"], rel=1e-4)
    assert not staging.exists()
