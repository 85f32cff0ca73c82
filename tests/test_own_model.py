"""Your own model: a pretrained model without a chat template, five architecture families, every PEFT method.

Each family gets a tiny random model saved the way a pretrained checkpoint comes: no chat template. SFT gives
it ChatML; the reward model trains its top block only (`trainable_layers` finds the family's blocks); PPO
trains a LoRA adapter on all linear layers (Conv1D in GPT-2) with the adapter-off policy as its reference and
the reward model's head as the critic's value head; evaluation compares base, SFT and PPO.
"""

import json
import math
import re

import pytest
import torch
from peft import get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from common.adapters import peft_config, start_prefix_from_tokens
from common.checkpoint import MANIFEST
from common.errors import PipelineError
from common.modeling import load_causal_lm
from common.options import AdapterOptions
from evaluation.evaluate import main as eval_main
from ppo.train import main as ppo_main
from reward_model.train import main as rm_main
from sft.train import main as sft_main
from tests.conftest import TINY, chat_rows, write_jsonl
from tests.test_reward_model import preference_rows

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "llama": lambda vocab: LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **SIZE),
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, num_key_value_heads=2, **SIZE),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, num_key_value_heads=2, sliding_window=None, **SIZE),
    "gpt2": lambda vocab: GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_inner=64),
    "gpt_neox": lambda vocab: GPTNeoXConfig(vocab_size=vocab, **SIZE),
}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer as a pretrained model brings one: byte-level BPE, an EOS, no pad and no chat tokens."""
    words = " ".join(row["messages"][i]["content"] for row in chat_rows(8) for i in (0, 1))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([words] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def pretrained_model(folder, family: str, tokenizer) -> None:
    """A random model of `family` saved without a chat template, as a pretrained checkpoint comes."""
    tokenizer.chat_template = None
    model = AutoModelForCausalLM.from_config(FAMILIES[family](len(tokenizer)))
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_chain(request, tmp_path_factory, tiny_base):
    """SFT -> RM -> PPO -> eval on one family. Llama keeps the embedded tokenizer, which has the ChatML tokens
    but no template; the others bring their own byte-level tokenizer without chat tokens or a pad, as most
    pretrained models do: SFT must add them and grow tied (GPT-2) and untied embeddings. Its 300-token
    vocabulary also makes these chains 4x faster than the embedded 49k."""
    family, tmp = request.param, tmp_path_factory.mktemp(request.param)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base) if family == "llama" else byte_level_tokenizer()
    pretrained_model(tmp / "base", family, tokenizer)
    sft_data = write_jsonl(tmp / "chat.jsonl", chat_rows(80))
    sft_main(["--config", str(TINY), "--model", str(tmp / "base"), "--data", str(sft_data),
              "--output_dir", str(tmp / "sft"), "--max_steps", "15"])
    rm_main(["--config", str(TINY), "--model", str(tmp / "sft"), "--data",
             str(write_jsonl(tmp / "prefs.jsonl", preference_rows(40))), "--output_dir", str(tmp / "rm"),
             "--trainable_layers", "1", "--max_steps", "12", "--learning_rate", "3e-3"])
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": row["messages"][0]["content"]} for row in chat_rows(16)])
    ppo_main(["--config", str(TINY), "--policy", str(tmp / "sft"), "--reward_model", str(tmp / "rm"),
              "--prompts", str(prompts), "--output_dir", str(tmp / "ppo"), "--num_updates", "2",
              "--peft_method", "lora", "--eval_every", "0", "--save_every", "0"])
    eval_main(["--config", str(TINY), "--checkpoints", f"base={tmp / 'base'},sft={tmp / 'sft'},ppo={tmp / 'ppo'}",
               "--prompts", str(prompts), "--reward_model", str(tmp / "rm"), "--sft_eval_data", "",
               "--num_prompts", "6", "--output_dir", str(tmp / "eval")])
    return family, tmp


def manifest(folder) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_sft_gives_a_pretrained_model_a_chat_template_and_learns(family_chain):
    family, tmp = family_chain
    assert AutoTokenizer.from_pretrained(tmp / "base").chat_template is None
    metrics = manifest(tmp / "sft")["metrics"]
    assert metrics["chat_template"].startswith("chatml")
    assert metrics["eval_loss"] < metrics["base_eval_loss"] - 0.3
    tokenizer = AutoTokenizer.from_pretrained(tmp / "sft")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = load_causal_lm(str(tmp / "sft"))
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    if family != "llama":  # plus a `<|pad|>` unless the tokenizer's class brings a default pad (Qwen2's)
        assert metrics["added_tokens"][:2] == ["<|im_start|>", "<|im_end|>"]
    if family == "gpt_neox":
        assert metrics["added_tokens"][2:] == ["<|pad|>"]


def test_reward_model_trains_the_top_block_of_each_family(family_chain):
    _, tmp = family_chain
    metrics = manifest(tmp / "rm")["metrics"]
    total = sum(p.numel() for p in load_causal_lm(str(tmp / "sft")).parameters())
    assert 0 < metrics["trainable_parameters"] < total / 2
    assert metrics["eval_accuracy"] > 0.5 and math.isfinite(metrics["reward_std"])


def test_ppo_with_lora_starts_at_kl_zero_and_stays_finite(family_chain):
    _, tmp = family_chain
    rows = [json.loads(line) for line in (tmp / "ppo" / "metrics.jsonl").read_text().splitlines()]
    updates = [row for row in rows if "objective/kl" in row]
    assert len(updates) == 2 and updates[0]["objective/kl"] == 0.0  # the adapter-off policy is the reference
    assert all(math.isfinite(value) for row in updates for value in row.values() if isinstance(value, float))
    assert AutoConfig.from_pretrained(tmp / "ppo").model_type == AutoConfig.from_pretrained(tmp / "base").model_type
    assert not (tmp / "ppo" / "adapter_config.json").exists()  # merged


def test_eval_compares_the_pretrained_model_too(family_chain):
    _, tmp = family_chain
    report = json.loads((tmp / "eval" / "report.json").read_text())
    assert set(report["checkpoints"]) == {"base", "sft", "ppo"}
    assert "win_gold" in report["checkpoints"]["ppo"] and report["checkpoints"]["ppo"]["kl"] is not None


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory, tiny_base):
    """The embedded tokenizer's tiny Llama without a chat template (it has the ChatML tokens already)."""
    folder = tmp_path_factory.mktemp("plain") / "base"
    pretrained_model(folder, "llama", AutoTokenizer.from_pretrained(tiny_base))
    return folder


@pytest.fixture(scope="module")
def new_tokens_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes") / "base"
    pretrained_model(folder, "llama", byte_level_tokenizer())
    return folder


@pytest.mark.parametrize("method,merged", [("lora", True), ("adalora", True), ("ia3", True), ("prefix", False),
                                           ("p_tuning", False), ("prompt", False)])
def test_every_peft_method_learns_and_reloads(method, merged, plain_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(80))
    output = tmp_path / "sft"
    sft_main(["--config", str(TINY), "--model", str(plain_llama), "--data", str(data), "--output_dir", str(output),
              "--peft_method", method, "--max_steps", "10", "--learning_rate", "3e-2", "--lora_dropout", "0"])
    metrics = manifest(output)["metrics"]
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["peft_method"] == method and metrics["adapter"] is not merged
    assert (output / "adapter_config.json").exists() is not merged
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(plain_llama).parameters())
    assert 0 < metrics["trainable_parameters"] < total / 10
    assert len(metrics["samples"]) == 2  # the saved checkpoint reloaded (base + adapter when kept) and answered


def test_p_tuning_prefix_starts_as_the_keys_and_values_of_real_tokens(plain_llama):
    """A prompt after the initial prefix is scored exactly as after those tokens in plain text."""
    model = AutoModelForCausalLM.from_pretrained(plain_llama)
    prefix, prompt = torch.tensor([5, 17, 300, 42]), torch.tensor([[7, 8, 9, 10, 11]])
    config = peft_config(AdapterOptions(peft_method="p_tuning", num_virtual_tokens=4), model, "CAUSAL_LM", "sft",
                         refused={}, total_steps=1)
    prefixed = get_peft_model(model, config)
    start_prefix_from_tokens(prefixed, prefix)
    with torch.no_grad():
        after_prefix = prefixed(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits
        after_text = model(input_ids=torch.cat([prefix[None], prompt], dim=1)).logits[:, len(prefix):]
    assert torch.allclose(after_prefix, after_text, atol=1e-5)


def test_lora_trains_the_embeddings_of_tokens_the_template_added(new_tokens_base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(80))
    sft_main(["--config", str(TINY), "--model", str(new_tokens_base), "--data", str(data),
              "--output_dir", str(tmp_path / "sft"), "--peft_method", "lora", "--max_steps", "10",
              "--learning_rate", "3e-2"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sft")
    base = AutoModelForCausalLM.from_pretrained(new_tokens_base).get_input_embeddings().weight
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").get_input_embeddings().weight
    new = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tuned.shape[0] == len(tokenizer) > base.shape[0]
    assert not tuned[new].isclose(tuned[new].mean(0, keepdim=True)).all()  # moved away from their mean start
    assert tuned[: base.shape[0]].equal(base)  # LoRA left every old row alone (merged into linears only)


@pytest.mark.parametrize("args,message", [
    (["--peft_method", "ia3"], "cannot train them"),
    (["--peft_method", "lora", "--merge", "false"], "keep merge: true"),
    (["--peft_method", "bitfit"], "peft_method must be one of"),
    (["--chat_template", "missing.jinja"], "neither auto, chatml nor a template file"),
    (["--chat_template", "PLAIN"], "--chat_template chatml"),
])
def test_sft_refusals_write_nothing(args, message, new_tokens_base, tmp_path):
    """What SFT cannot make trainable stops before any output (`run_cli` makes it one line and exit 2)."""
    template = tmp_path / "plain.jinja"  # no {% generation %} markers
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    args = [str(template) if arg == "PLAIN" else arg for arg in args]
    with pytest.raises(PipelineError, match=re.escape(message)):
        sft_main(["--config", str(TINY), "--model", str(new_tokens_base), "--data",
                  str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))), "--output_dir", str(tmp_path / "out"),
                  *args])
    assert not list(tmp_path.glob("*out*"))


@pytest.fixture(scope="module")
def prefix_sft(tmp_path_factory, plain_llama):
    tmp = tmp_path_factory.mktemp("prefix")
    sft_main(["--config", str(TINY), "--model", str(plain_llama), "--data",
              str(write_jsonl(tmp / "chat.jsonl", chat_rows(40))), "--output_dir", str(tmp / "sft"),
              "--peft_method", "prefix", "--max_steps", "2"])
    return tmp / "sft"


def test_later_stages_refuse_what_they_cannot_take(prefix_sft, plain_llama, tiny_base, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    cases = [
        (rm_main, ["--model", str(prefix_sft), "--data", str(prefs)], "a reward model starts from whole"),
        (rm_main, ["--model", str(tiny_base), "--data", str(prefs), "--peft_method", "prompt"], "not supported here"),
        (rm_main, ["--model", str(plain_llama), "--data", str(prefs)], "has no chat template"),
        (ppo_main, ["--policy", str(prefix_sft), "--reward_model", str(tiny_base)], "PPO starts from whole weights"),
        (ppo_main, ["--peft_method", "p_tuning"], "not supported here"),
        (ppo_main, ["--critic_peft_method", "prompt"], "not supported here"),
    ]
    for main, args, message in cases:
        with pytest.raises(PipelineError, match=re.escape(message)):
            main(["--config", str(TINY), "--output_dir", str(tmp_path / "out"), *args])
        assert not list(tmp_path.glob("*out*"))
