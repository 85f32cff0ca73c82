"""Our decoding loop (common/sampling.py): greedy replies are `generate`'s with either backend, draws follow
softmax(logits / T), sampling stops once every reply ended, and PPO runs on the compiled backend."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from common.errors import PipelineError
from common.sampling import CHECK_EVERY, sample
from ppo.config import PPOStageConfig
from ppo.rollout import sample_replies
from ppo.train import main
from tests.conftest import CPU, TINY, ScriptedPolicy

PROMPTS = ["hello", "how are you today? tell me about your week", "what do you like to eat?", "bye"]


def left_padded(tokenizer, prompts: list[str]) -> dict:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_greedy_replies_are_those_of_generate(make_run, backend):
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    model = AutoModelForCausalLM.from_pretrained(make_run / "sft").eval()
    batch = left_padded(tokenizer, PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any()  # the prompts are of different lengths
    expected = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1]:]
    # Twice: the compiled backend's second call reuses its compiled step and its reset static cache.
    for _ in range(2):
        replies = sample(model, batch["input_ids"], batch["attention_mask"], 12, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, backend=backend)
        for row, length in enumerate(replies.lengths.tolist()):
            assert replies.tokens[row, :length].tolist() == expected[row, :length].tolist()
            assert (replies.tokens[row, length:] == tokenizer.pad_token_id).all()


class FixedLogits(torch.nn.Module):
    """A causal LM with the same next-token logits after every prefix."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.config = LlamaConfig(vocab_size=len(logits), hidden_size=8, num_hidden_layers=1, num_attention_heads=1)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(len(input_ids), 1, -1))


def test_draws_follow_the_softmax_at_the_temperature_and_the_seed():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    model, prompts = FixedLogits(logits), torch.ones(20000, 1, dtype=torch.long)
    for temperature in (1.0, 0.5):
        torch.manual_seed(0)
        drawn = sample(model, prompts, torch.ones_like(prompts), 1, eos_token_id=4, pad_token_id=4,
                       temperature=temperature).tokens[:, 0]
        share = torch.bincount(drawn, minlength=len(logits)) / len(drawn)
        # 20,000 draws: one standard error of a share is at most 0.0036.
        assert torch.allclose(share, torch.softmax(logits / temperature, dim=0), atol=0.015), (temperature, share)
    torch.manual_seed(1)
    first = sample(model, prompts[:64], torch.ones_like(prompts[:64]), 3, 4, 4, temperature=1.0).tokens
    torch.manual_seed(1)
    assert torch.equal(first, sample(model, prompts[:64], torch.ones_like(prompts[:64]), 3, 4, 4, 1.0).tokens)
    assert sample(model, prompts[:8], torch.ones_like(prompts[:8]), 3, 4, 4, temperature=0.0).tokens.eq(0).all()


def test_sampling_stops_once_every_reply_has_ended():
    eos, pad = 7, 0
    scripted = torch.tensor([[3, eos] + [5] * 31, [eos] + [5] * 32, [3, 3, 3, eos] + [5] * 29])
    replies = sample(ScriptedPolicy(scripted, 10), torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2), 32, eos,
                     pad, temperature=1.0)
    # Whether all rows ended is asked every CHECK_EVERY tokens (a host sync), not after every token.
    assert replies.tokens.shape == (3, CHECK_EVERY)
    assert replies.lengths.tolist() == [2, 1, 4] and replies.finished.all()
    assert replies.tokens[0].tolist() == [3, eos] + [pad] * (CHECK_EVERY - 2)
    unfinished = sample(ScriptedPolicy(scripted[:, 1:], 10), torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2),
                        32, eos, pad, temperature=1.0)
    assert unfinished.tokens.shape == (3, 32)  # row 2 never samples EOS: the loop runs to the limit
    assert unfinished.lengths.tolist() == [1, 32, 3] and unfinished.finished.tolist() == [True, False, True]


def test_ppo_rollouts_are_the_same_from_both_backends(make_run):
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    policy = AutoModelForCausalLM.from_pretrained(make_run / "sft")
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8], [9, 10, 11], [12, 13]]
    rollouts = [sample_replies(policy, tokenizer, prompts, PPOStageConfig(max_new_tokens=10, generation_batch_size=2,
                                                                          generation_backend=backend), CPU, seed=3)
                for backend in ("eager", "compiled")]
    assert torch.equal(rollouts[0].sequences, rollouts[1].sequences)
    assert torch.equal(rollouts[0].reply_mask, rollouts[1].reply_mask)


def test_ppo_on_the_compiled_backend(make_run, tmp_path):
    with pytest.raises(PipelineError, match="generation_backend must be one of eager, compiled, got 'vllm'"):
        main(["--config", str(TINY), "--generation_backend", "vllm", "--output_dir", str(tmp_path / "refused")])
    output = tmp_path / "ppo"
    main(["--config", str(TINY), "--policy", str(make_run / "sft"), "--reward_model", str(make_run / "rm"),
          "--prompts", str(make_run / "data" / "prompts_ppo.jsonl"), "--output_dir", str(output),
          "--generation_backend", "compiled", "--num_updates", "2", "--save_every", "0"])
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["objective/kl"] == 0.0 and rows[-1]["update"] == 2
    assert all(value == value for row in rows for value in row.values() if isinstance(value, float))  # no NaN
    assert json.loads((output / "pipeline.json").read_text())["config"]["generation_backend"] == "compiled"
