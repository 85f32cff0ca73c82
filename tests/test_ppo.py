"""Stage 3, PPO: the maths against hand-computed values, rollouts, the LoRA reference, learning on a
synthetic reward, kill-and-resume, and every input error."""

import json
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import PipelineError
from common.modeling import freeze_lower_blocks
from ppo.config import PPOStageConfig
from ppo.core import generalized_advantages, kl_estimate, masked_whiten, token_logprobs, token_rewards
from ppo.models import PolicyAndCritic, build_models, disable_dropout
from ppo.rollout import sample_replies, score_rollout
from ppo.top_blocks import lowest_trained_block, resumes_exactly
from ppo.train import main
from tests.conftest import (
    CPU,
    REWARD_MODULE,
    TINY,
    ScriptedPolicy,
    kill_when,
    one_error_line,
    run_in_process,
    run_module,
    write_jsonl,
)
from tests.test_own_model import FAMILIES


def ppo_args(run, output, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--policy", str(run / "sft"), "--reward_model", str(run / "rm"),
            "--prompts", str(run / "data" / "prompts_ppo.jsonl"), "--output_dir", str(output), *extra]


def test_gae_and_whitening_match_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])  # 9.0: padding, must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: deltas 0.1, 0.1, 0.7 (the value after the last token is 0); A_t = delta_t + 0.5 * A_{t+1}.
    # Row 1: one token, delta = 0.5 - 0.4.
    assert torch.allclose(advantages, torch.tensor([[0.325, 0.45, 0.7], [0.1, 0.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.425, 0.65, 1.0], [0.5, 0.0, 0.0]]))
    whitened = masked_whiten(advantages, mask)
    real = [0.325, 0.45, 0.7, 0.1]
    expected = [(a - statistics.fmean(real)) / statistics.stdev(real) for a in real]
    assert torch.allclose(whitened[mask.bool()], torch.tensor(expected), atol=1e-5)
    assert whitened[1, 1] == 0 and whitened[1, 2] == 0


def test_score_lands_on_the_last_real_token_and_every_token_pays_kl():
    kl = torch.full((2, 4), 0.1)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl * mask, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.05, 1.95, 0.0], [-0.05, -0.05, -0.05, -1.05]]))


def test_kl_estimators():
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_estimate(logprobs, ref, "k1"), torch.tensor([0.5, -1.0]))
    # k3 = (r - 1) - log r with r = pi_ref / pi: never negative.
    r = torch.exp(ref - logprobs)
    assert torch.allclose(kl_estimate(logprobs, ref, "k3"), (r - 1) - torch.log(r))
    assert (kl_estimate(logprobs, ref, "k3") >= 0).all()


def test_replies_are_cut_after_the_first_eos_and_rewarded_there(make_run):
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # Reply 0 ends at its second token (tokens after EOS are dropped); reply 1 runs into the length
    # limit without EOS; reply 2 samples the pad id as an ordinary token, which must stay part of it.
    scripted = torch.tensor([[5, eos, 7, 8], [5, 6, 7, 8], [pad, 6, eos, 8]])
    config = PPOStageConfig(max_new_tokens=4, generation_batch_size=2)
    rollout = sample_replies(ScriptedPolicy(scripted, len(tokenizer)), tokenizer, [[1, 2, 3], [4], [9, 9]], config,
                             CPU, seed=0)
    assert rollout.context == 3
    assert rollout.reply_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert rollout.finished.tolist() == [True, False, True]
    assert rollout.sequences[0].tolist() == [1, 2, 3, 5, eos, pad, pad]
    assert rollout.sequences[1].tolist() == [pad, pad, 4, 5, 6, 7, 8]
    assert rollout.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]
    rewards = token_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 4), rollout.reply_mask, kl_coef=0.1)
    assert rewards.tolist() == [[0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 3, 0]]


def test_lora_reference_is_the_initial_policy_and_micro_batches_reproduce_rollout_logprobs(make_run):
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    config = PPOStageConfig(policy=str(make_run / "sft"), reward_model=str(make_run / "rm"), peft_method="lora",
                            max_new_tokens=6, generation_batch_size=4, temperature=0.8)
    torch.manual_seed(0)
    policy, critic, reference = build_models(config, tokenizer)
    assert reference is None  # the adapter-disabled policy is the reference: one backbone in memory
    model = PolicyAndCritic(policy, critic)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]]
    rollout = sample_replies(model.policy, tokenizer, prompts, config, CPU, seed=0)
    score_rollout(model, None, rollout, config, CPU)
    mask = rollout.reply_mask.bool()
    # Before any update the adapter is the identity: reference log-probs equal the policy's and the SFT model's.
    assert torch.allclose(rollout.ref_logprobs[mask], rollout.logprobs[mask], atol=1e-5)
    sft = AutoModelForCausalLM.from_pretrained(make_run / "sft")
    ids, attention, positions, width = rollout.micro(torch.arange(4))
    full_logits = sft(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    sft_logprobs = token_logprobs(full_logits[:, -width - 1:-1], ids[:, -width:], 0.8)
    assert torch.allclose(sft_logprobs[mask[:, :width]], rollout.logprobs[mask], atol=1e-4)
    # Recomputed on smaller micro-batches (other padding widths) the log-probs match: the PPO ratio starts at 1.
    for rows in (torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3])):
        ids, attention, positions, width = rollout.micro(rows)
        logits, _, _ = model(ids, attention, positions, width)
        again = token_logprobs(logits, ids[:, -width:], 0.8)
        assert torch.allclose(again[mask[rows, :width]], rollout.logprobs[rows, :width][mask[rows, :width]], atol=1e-4)
    # After the adapter moves, the policy changes and the reference does not.
    with torch.no_grad():
        for name, parameter in model.policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    moved = rollout.__class__(rollout.sequences, rollout.attention_mask, rollout.context, rollout.reply_mask,
                              rollout.finished)
    score_rollout(model, None, moved, config, CPU)
    assert torch.allclose(moved.ref_logprobs[mask], rollout.ref_logprobs[mask], atol=1e-5)
    assert not torch.allclose(moved.logprobs[mask], rollout.logprobs[mask], atol=1e-3)


def test_learning_from_the_kept_input_of_the_top_block_equals_the_whole_forward(make_run):
    """Trained in its top block, policy and critic keep the rollout's input of that block; learning forwards run
    the top block from it and give the logits, values and gradients of the whole network, on any rows."""
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    config = PPOStageConfig(policy=str(make_run / "sft"), reward_model=str(make_run / "rm"), trainable_layers=1,
                            max_new_tokens=6, generation_batch_size=4, temperature=0.8)
    torch.manual_seed(0)
    policy, critic, reference = build_models(config, tokenizer)
    blocks = (lowest_trained_block(policy), lowest_trained_block(critic))
    assert blocks == (1, 1) and all(resumes_exactly(n, 1, CPU) for n in (policy, critic))
    model = PolicyAndCritic(policy, critic)
    rollout = sample_replies(model.policy, tokenizer, [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]], config, CPU, seed=0)
    score_rollout(model, reference, rollout, config, CPU, keep_from=blocks)
    trained = [p for p in model.parameters() if p.requires_grad]
    for rows in (torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3, 1, 0])):
        ids, attention, positions, width = rollout.micro(rows)
        outputs = []
        for starts in (None, rollout.micro_starts(rows)):
            logits, values, _ = model(ids, attention, positions, width, starts=starts)
            outputs.append((logits, values, torch.autograd.grad(logits.sum() + values.sum(), trained)))
        (logits, values, grads), (top_logits, top_values, top_grads) = outputs
        assert torch.allclose(top_logits, logits, atol=1e-5) and torch.allclose(top_values, values, atol=1e-5)
        # The kept input was computed on the rollout's padding, not the micro-batch's: equal up to fp32 rounding.
        assert all((a - b).norm() <= 1e-5 * b.norm() for a, b in zip(top_grads, grads, strict=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_learning_starts_at_the_top_blocks_only_where_the_backbone_feeds_its_blocks_unchanged(family):
    """GPT-2 adds its position embeddings to `inputs_embeds`: running its top block from a kept input would
    lose them, and the check says so; Llama, Qwen2, Mistral and GPT-NeoX hand it to the first block as it is."""
    model = AutoModelForCausalLM.from_config(FAMILIES[family](64))
    disable_dropout(model)
    freeze_lower_blocks(model, 1)
    assert lowest_trained_block(model) == 1
    assert resumes_exactly(model, 1, CPU) == (family != "gpt2")


def test_make_ppo_writes_the_checkpoint_contract(make_run):
    # conftest's make_run ran `make ppo` on the tiny config: base -> data -> sft -> prefs -> rm -> ppo.
    ppo = make_run / "ppo"
    manifest = json.loads((ppo / "pipeline.json").read_text())
    assert manifest["stage"] == "ppo" and manifest["metrics"]["updates"] == 4
    assert {"final_reward", "final_kl", "final_judge_score", "initial_reward"} <= set(manifest["metrics"])
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert [row["update"] for row in rows] == [0, 1, 2, 3, 4]
    assert {"reward/score", "objective/kl", "policy/clipfrac", "loss/value", "reply/eos_rate"} <= set(rows[1])
    # Where each update's time went: the phases, each under way, add up to the update.
    phases = [rows[1][f"time/{phase}"] for phase in ("sample", "score", "reward", "advantages", "learn")]
    assert all(seconds > 0 for seconds in phases) and sum(phases) == pytest.approx(rows[1]["time/update"])
    assert list((ppo / "tensorboard").iterdir())
    assert not (make_run / ".ppo.partial").exists()
    tokenizer = AutoTokenizer.from_pretrained(ppo)
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    batch = tokenizer(["hello there"], return_tensors="pt")
    assert policy.generate(**batch, max_new_tokens=3, do_sample=False).shape[1] > batch["input_ids"].shape[1]
    from transformers import AutoModelForSequenceClassification
    critic = AutoModelForSequenceClassification.from_pretrained(ppo / "value")
    assert critic(**batch).logits.shape == (1, 1)
    assert json.loads((ppo / "value" / "pipeline.json").read_text())["stage"] == "ppo-critic"


def test_reward_rises_on_a_learnable_synthetic_reward(make_run, love_or_hate, tmp_path, monkeypatch):
    sft, prompts = love_or_hate
    (tmp_path / "synthetic_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    output = tmp_path / "ppo"
    main(ppo_args(make_run, output, "--policy", str(sft), "--prompts", str(prompts), "--num_eval_prompts", "8",
                  "--reward_model_weight", "0", "--extra_rewards", "synthetic_reward:love=1", "--judge", "",
                  "--missing_eos_penalty", "0", "--num_updates", "8", "--rollout_batch_size", "16",
                  "--generation_batch_size", "16", "--mini_batch_size", "8", "--micro_batch_size", "8",
                  "--learning_rate", "3e-3", "--kl_coef", "0.01", "--save_every", "0", "--eval_every", "8"))
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward/synthetic_reward:love"] for row in rows[1:]]
    assert rewards[0] < 0.75, rewards  # the SFT model does not say "love" every time
    assert statistics.fmean(rewards[-2:]) > rewards[0] + 0.25, rewards
    assert rows[-1]["eval/reward"] > rows[0]["eval/reward"], (rows[0], rows[-1])


def test_kill_and_resume_reaches_the_same_updates_and_weights(make_run, tmp_path, capsys):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert run_in_process("ppo", *ppo_args(make_run, straight, "--num_updates", "6")) == 0
    resumed = tmp_path / "resumed"
    pointer = tmp_path / ".resumed.partial" / "resume" / "latest.json"
    kill_when("ppo", ppo_args(make_run, resumed, "--num_updates", "6"), pointer.exists)
    assert not (resumed / "pipeline.json").exists()  # killed: nothing looks complete
    capsys.readouterr()
    assert run_in_process("ppo", *ppo_args(make_run, resumed, "--num_updates", "6")) == 0
    assert "resuming from" in capsys.readouterr().out
    manifest = json.loads((resumed / "pipeline.json").read_text())
    assert manifest["metrics"]["updates"] == 6
    rows = [json.loads(line)["update"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3, 4, 5, 6]
    # The restored optimizer, scheduler and RNG make the resumed run the same run.
    a, b = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.allclose(a[key], b[key]) for key in a)


@pytest.mark.parametrize("case", ["missing_policy", "missing_rm", "empty_prompts", "long_prompt",
                                  "tokenizer_mismatch", "bad_reward_spec", "bad_batch_sizes", "missing_reference",
                                  "reference_with_adapter"])
def test_input_errors_give_one_line_and_write_nothing(make_run, tmp_path, case, capsys):
    output = tmp_path / "ppo"
    args = ppo_args(make_run, output)
    if case == "missing_policy":
        args[args.index("--policy") + 1] = str(tmp_path / "nope")
        expected = "does not exist"
    elif case == "missing_rm":
        args[args.index("--reward_model") + 1] = str(tmp_path / "no_rm")
        expected = "does not exist"
    elif case == "empty_prompts":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        args[args.index("--prompts") + 1] = str(empty)
        expected = "empty.jsonl"
    elif case == "long_prompt":
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}] * 20 + [{"prompt": "word " * 200}])
        args[args.index("--prompts") + 1] = str(prompts)
        expected = "rows 21"
    elif case == "tokenizer_mismatch":
        other = tmp_path / "other_rm"
        tokenizer = AutoTokenizer.from_pretrained(make_run / "rm")
        tokenizer.add_tokens(["<new_token>"])
        tokenizer.save_pretrained(other)
        (other / "config.json").write_text((make_run / "rm" / "config.json").read_text())
        args[args.index("--reward_model") + 1] = str(other)
        expected = "differs from the policy's"
    elif case == "bad_reward_spec":
        args += ["--extra_rewards", "no_such_module:judge=1"]
        expected = "no_such_module"
    elif case == "missing_reference":
        args += ["--reference", str(tmp_path / "no_sft")]
        expected = "reference"
    elif case == "reference_with_adapter":
        args += ["--reference", str(make_run / "sft"), "--peft_method", "lora"]
        expected = "adapter off"
    else:
        args += ["--mini_batch_size", "3"]
        expected = "multiple of"
    assert run_in_process("ppo", *args) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not output.exists() and not (tmp_path / ".ppo.partial").exists()


def test_ppo_ptx_adds_an_sft_loss(make_run, tmp_path):
    with pytest.raises(PipelineError, match="ptx_data"):
        main(ppo_args(make_run, tmp_path / "refused", "--ptx_coef", "0.5"))
    output = tmp_path / "ptx"
    main(ppo_args(make_run, output, "--ptx_coef", "0.5", "--ptx_data", str(make_run / "data" / "sft_eval.jsonl"),
                  "--num_updates", "1", "--save_every", "0"))
    row = json.loads((output / "metrics.jsonl").read_text().splitlines()[1])
    assert 0 < row["loss/ptx"] < 20  # cross-entropy of the tiny model on chat text, vocabulary ln(49152) = 10.8


def test_diverging_run_stops_with_one_line(make_run, tmp_path):
    result = run_module("ppo", *ppo_args(make_run, tmp_path / "ppo", "--learning_rate", "1e30", "--num_updates", "2"))
    assert result.returncode == 2
    # The exploded weights give a NaN gradient at the next step: stopped before the step is taken.
    assert "error: ppo: non-finite gradient norm at update 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ppo").exists()
