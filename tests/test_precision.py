"""The precision policy and what a GPU run depends on, checked on the CPU: bf16 autocast through every stage
(what `precision: auto` picks on a GPU), the KL of identical weights exactly 0, no attention row left without a
key (the cause of NaN gradients in bf16 on the GPU), broken logits and accelerator failures as one line."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common.distributed
from common.errors import PipelineError, run_cli
from common.modeling import generate_reply_ids
from common.precision import Compute, choose_precision
from common.reward import RewardScorer
from ppo.config import PPOStageConfig
from ppo.core import token_logprobs
from ppo.models import PolicyAndCritic, build_models
from ppo.rollout import sample_replies, score_rollout
from tests.conftest import CPU, ROOT, TINY, chat_rows, run_module, write_jsonl

CPU_DEVICE = torch.device("cpu")


@pytest.mark.parametrize(("amx", "avx512_bf16"), [(True, False), (False, True), (True, True), (False, False)])
def test_auto_is_bf16_on_a_cpu_with_bf16_instructions_else_fp32_and_bf16_may_be_asked_for(amx, avx512_bf16,
                                                                                          monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert choose_precision("auto", CPU_DEVICE) == ("bf16" if amx or avx512_bf16 else "fp32")
    assert choose_precision("bf16", CPU_DEVICE) == "bf16"
    assert choose_precision("fp32", CPU_DEVICE) == "fp32"
    with pytest.raises(PipelineError, match="fp16 needs a GPU"):
        choose_precision("fp16", CPU_DEVICE)
    with pytest.raises(PipelineError, match="must be auto, fp32, bf16 or fp16"):
        choose_precision("bfloat16", CPU_DEVICE)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, tiny_base, make_run) -> dict:
    """SFT, RM and PPO of the tiny config in bf16 autocast on the CPU, each in its own process (as `make` runs
    them; accelerate fixes a process's precision the first time a stage sets it). Half the tiny config's steps:
    bf16 on a CPU without bf16 instructions is slow, and learning is visible sooner."""
    tmp = tmp_path_factory.mktemp("bf16")
    chat = write_jsonl(tmp / "chat.jsonl", chat_rows(64))
    bf16 = ["--config", str(TINY), "--precision", "bf16"]
    stages = [
        ("sft", "--model", str(tiny_base), "--data", str(chat), "--output_dir", str(tmp / "sft"), "--max_steps", "6"),
        ("reward_model", "--model", str(make_run / "sft"), "--data", str(make_run / "prefs" / "ranked.jsonl"),
         "--output_dir", str(tmp / "rm"), "--max_steps", "8"),
        ("ppo", "--policy", str(make_run / "sft"), "--reward_model", str(make_run / "rm"), "--prompts",
         str(make_run / "data" / "prompts_ppo.jsonl"), "--output_dir", str(tmp / "ppo"), "--num_updates", "2"),
        ("ppo", "--policy", str(make_run / "sft"), "--reward_model", str(make_run / "rm"), "--prompts",
         str(make_run / "data" / "prompts_ppo.jsonl"), "--output_dir", str(tmp / "ppo_lora"), "--num_updates", "2",
         "--peft_method", "lora", "--critic_peft_method", "lora", "--eval_every", "0"),
        ("ppo", "--policy", str(make_run / "sft"), "--reward_model", str(make_run / "rm"), "--prompts",
         str(make_run / "data" / "prompts_ppo.jsonl"), "--output_dir", str(tmp / "ppo_top"), "--num_updates", "2",
         "--trainable_layers", "1", "--eval_every", "0"),
        # The trl stages with frozen weights: an adapter's base, the blocks below trainable_layers.
        ("sft", "--model", str(tiny_base), "--data", str(chat), "--output_dir", str(tmp / "sft_lora"), "--max_steps",
         "6", "--peft_method", "lora"),
        ("reward_model", "--model", str(make_run / "sft"), "--data", str(make_run / "prefs" / "ranked.jsonl"),
         "--output_dir", str(tmp / "rm_top"), "--max_steps", "8", "--trainable_layers", "1"),
        ("dpo", "--model", str(make_run / "sft"), "--data", str(make_run / "prefs" / "ranked.jsonl"), "--output_dir",
         str(tmp / "dpo_top"), "--max_steps", "4", "--logging_steps", "1", "--trainable_layers", "1"),
        ("rloo", "--policy", str(make_run / "sft"), "--reward_model", str(make_run / "rm"), "--prompts",
         str(make_run / "data" / "prompts_ppo.jsonl"), "--output_dir", str(tmp / "rloo_top"), "--max_steps", "2",
         "--trainable_layers", "1"),
    ]
    printed = {}
    for module, *args in stages:
        result = run_module(module, *bf16, *args, env={"CUDA_VISIBLE_DEVICES": ""})
        assert result.returncode == 0, result.stderr[-3000:]
        printed[Path(args[args.index("--output_dir") + 1]).name] = result.stdout
    return {"tmp": tmp, "make_run": make_run, "tiny_base": tiny_base, "printed": printed}


def manifest_metrics(folder) -> dict:
    return json.loads((folder / "pipeline.json").read_text())["metrics"]


def test_sft_and_rm_in_bf16_learn_and_reload(bf16_runs):
    tmp = bf16_runs["tmp"]
    sft = manifest_metrics(tmp / "sft")
    assert math.isfinite(sft["eval_loss"]) and sft["eval_loss"] < sft["base_eval_loss"]
    assert json.loads((tmp / "sft" / "pipeline.json").read_text())["config"]["precision"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(tmp / "sft")
    assert model.dtype == torch.float32  # trained weights are kept in fp32; bf16 is the compute format
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
    rm = manifest_metrics(tmp / "rm")
    assert all(math.isfinite(rm[key]) for key in ("train_loss", "eval_accuracy", "reward_mean", "reward_std"))
    assert AutoModelForSequenceClassification.from_pretrained(tmp / "rm", num_labels=1).config.num_labels == 1


def test_ppo_in_bf16_starts_at_kl_zero_and_stays_finite(bf16_runs):
    ppo = bf16_runs["tmp"] / "ppo"
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    # Policy and reference are the same weights run the same way: not a rounding error of KL, none at all.
    assert rows[0]["eval/kl"] == 0.0 and rows[1]["objective/kl"] == 0.0
    assert all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
    assert rows[-1]["objective/kl"] > 0  # and then it learns
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    assert policy.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape[1] > 3


def test_frozen_models_are_held_in_the_compute_dtype_and_trained_ones_in_fp32(make_run):
    bf16 = Compute(CPU_DEVICE, "bf16")
    assert RewardScorer.load(str(make_run / "rm"), bf16).model.dtype == torch.bfloat16
    assert RewardScorer.load(str(make_run / "rm"), CPU).model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    config = PPOStageConfig(policy=str(make_run / "sft"), reward_model=str(make_run / "rm"), peft_method="lora",
                            critic_peft_method="lora")
    policy, critic, reference = build_models(config, tokenizer, bf16.dtype)
    for network in (policy, critic):
        trained = [p for p in network.parameters() if p.requires_grad]
        frozen = [p for p in network.parameters() if not p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained)  # adapters and the critic's head
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # A full fine-tune's reference is stored like the policy: identical weights, identical log-probs.
    full = PPOStageConfig(policy=str(make_run / "sft"), reward_model=str(make_run / "rm"))
    policy, critic, reference = build_models(full, tokenizer, bf16.dtype)
    assert {p.dtype for model in (policy, critic, reference) for p in model.parameters()} == {torch.float32}
    # Trained in its top block only: the blocks below (and the embeddings) are frozen, so bf16; the reference
    # is laid out parameter by parameter like the policy.
    top = PPOStageConfig(policy=str(make_run / "sft"), reward_model=str(make_run / "rm"), trainable_layers=1)
    policy, critic, reference = build_models(top, tokenizer, bf16.dtype)
    for network in (policy, critic):
        assert {p.dtype for p in network.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in network.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert [p.dtype for p in reference.parameters()] == [p.dtype for p in policy.parameters()]


def test_ppo_trained_in_its_top_blocks_starts_at_kl_zero_and_writes_the_frozen_blocks_in_fp32(bf16_runs):
    """Frozen blocks held in bf16 (policy, critic and the reference alike) still give a KL of exactly 0 at
    the start; the checkpoint carries the SFT weights of the frozen blocks bit for bit, not their bf16 rounding,
    and the fp32 update of the trained block."""
    ppo, sft = bf16_runs["tmp"] / "ppo_top", bf16_runs["make_run"] / "sft"
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] == 0.0 and rows[-1]["objective/kl"] != 0.0
    assert all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
    before = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    assert policy.dtype == torch.float32  # what config.json says, as the weights are
    after = policy.state_dict()
    moved = {name for name, weight in after.items() if not torch.equal(weight, before[name])}
    assert moved and all(name.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for name in moved)
    critic = AutoModelForSequenceClassification.from_pretrained(ppo / "value", num_labels=1).state_dict()
    rm = AutoModelForSequenceClassification.from_pretrained(bf16_runs["make_run"] / "rm", num_labels=1).state_dict()
    assert torch.equal(critic["model.embed_tokens.weight"], rm["model.embed_tokens.weight"])
    assert not torch.equal(critic["score.weight"], rm["score.weight"])


def test_memory_trace_counts_the_bytes_ppo_holds(make_run):
    """bench/ppo_memory.py's models, built from a config and traced as fake tensors, hold the bytes of the models
    PPO builds in bf16 (full fine-tune of the top blocks, and adapters on both networks); the optimizer state is
    AdamW's two fp32 moments (and a step counter) per trained weight; the peaks hold all of that and grow with
    the micro-batch."""
    spec = importlib.util.spec_from_file_location("ppo_memory", ROOT / "bench" / "ppo_memory.py")
    ppo_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ppo_memory)
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    rm = RewardScorer.load(str(make_run / "rm"), Compute(CPU_DEVICE, "bf16")).model
    shape = AutoConfig.from_pretrained(make_run / "sft")
    for options in ({"trainable_layers": 1}, {"peft_method": "lora", "critic_peft_method": "lora"}):
        config = PPOStageConfig(policy=str(make_run / "sft"), reward_model=str(make_run / "rm"), **options)
        policy, critic, reference = build_models(config, tokenizer, torch.bfloat16)
        held = sum(t.numel() * t.element_size() for model in (policy, critic, reference, rm) if model is not None
                   for t in [*model.parameters(), *model.buffers()])
        trained = [p for model in (policy, critic) for p in model.parameters() if p.requires_grad]
        trace = ppo_memory.traced(config, shape, seq_len=48)
        assert trace["weights"] * ppo_memory.GIB == held
        assert trace["gradients"] * ppo_memory.GIB == 4 * sum(p.numel() for p in trained) > 0
        assert trace["adamw"] * ppo_memory.GIB == sum(8 * p.numel() + 4 for p in trained)
        persistent = trace["weights"] + trace["gradients"] + trace["adamw"]
        assert trace["learning_peak"] > persistent and trace["rollout_peak"] > trace["weights"] + trace["adamw"]
        wider = dataclasses.replace(config, micro_batch_size=2 * config.micro_batch_size,
                                    mini_batch_size=2 * config.mini_batch_size)
        wider = ppo_memory.traced(wider, shape, seq_len=48)
        assert wider["learning_peak"] - persistent > 1.5 * (trace["learning_peak"] - persistent)


def test_ppo_with_adapters_on_a_bf16_base_starts_at_kl_zero_and_merges_its_update(bf16_runs):
    """The LoRA run holds the SFT weights in bf16 and trains fp32 adapters on them. Merged into bf16 weights the
    small update would mostly round away; merged in fp32, the adapted weights are no longer bf16 numbers."""
    ppo, sft = bf16_runs["tmp"] / "ppo_lora", bf16_runs["make_run"] / "sft"
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] == 0.0 and rows[-1]["objective/kl"] != 0.0  # then the adapters move it
    assert all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    before = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    assert policy.dtype == torch.float32
    moved = [name for name, weight in policy.state_dict().items()
             if not torch.equal(weight, before[name].to(torch.bfloat16).float())]
    assert moved and all("proj" in name for name in moved)  # only the adapted projections changed
    assert all(not torch.equal(policy.state_dict()[name], policy.state_dict()[name].to(torch.bfloat16).float())
               for name in moved)  # by updates finer than bf16 resolves: merged in fp32


def changed_weights(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, weight in after.items() if name in before and not torch.equal(weight, before[name])}


@pytest.mark.parametrize("run", ["sft_lora", "rm_top", "dpo_top", "rloo_top"])
def test_trl_stages_hold_frozen_weights_in_bf16_and_write_back_what_they_trained_in_fp32(bf16_runs, run):
    """SFT with LoRA, and RM, DPO and RLOO trained in their top block, hold what they do not train in bf16. Their
    checkpoints carry the frozen weights they started from bit for bit (an adapter merged into the fp32 base,
    frozen blocks written back from their fp32 source) and the trained ones at fp32 resolution."""
    assert "frozen parameters held in bf16, the trained ones in fp32" in bf16_runs["printed"][run]
    tmp, make_run = bf16_runs["tmp"], bf16_runs["make_run"]
    start = bf16_runs["tiny_base"] if run == "sft_lora" else make_run / "sft"
    load = AutoModelForSequenceClassification if run == "rm_top" else AutoModelForCausalLM
    trained = load.from_pretrained(tmp / run, **({"num_labels": 1} if run == "rm_top" else {}))
    assert trained.dtype == torch.float32
    after = trained.state_dict()
    moved = changed_weights(AutoModelForCausalLM.from_pretrained(start).state_dict(), after)
    if run == "sft_lora":
        assert moved and all("proj" in name for name in moved)  # only the adapted projections
    else:
        assert moved and all(name.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for name in moved)
    assert all(not torch.equal(after[name], after[name].to(torch.bfloat16).float()) for name in moved)


def test_dpo_and_rloo_references_are_laid_out_like_their_policies(bf16_runs):
    """With the policy's frozen blocks in bf16, the reference's are too: DPO's implicit rewards and RLOO's KL
    start at exactly 0."""
    dpo = [json.loads(line) for line in (bf16_runs["tmp"] / "dpo_top" / "metrics.jsonl").read_text().splitlines()]
    first = next(row for row in dpo if "rewards/margins" in row)
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    assert any(row.get("rewards/margins", 0.0) != 0.0 for row in dpo[1:])
    rloo = [json.loads(line) for line in (bf16_runs["tmp"] / "rloo_top" / "metrics.jsonl").read_text().splitlines()]
    kls = [row["kl"] for row in rloo if "kl" in row]
    assert kls[0] == 0.0 and all(math.isfinite(kl) for kl in kls)


def test_ppo_forwards_leave_no_attention_row_without_a_key(make_run, monkeypatch):
    """Left-padded rows would reach attention with every key masked; cuDNN's backward turns such rows into NaN
    gradients on the GPU. Every mask that PPO's forwards (rollout, reference, learning) hand to SDPA must give
    each query at least one key, and the real tokens must see what the ordinary padding mask gives them."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    config = PPOStageConfig(policy=str(make_run / "sft"), reward_model=str(make_run / "rm"), max_new_tokens=6,
                            generation_batch_size=4, temperature=0.8)
    policy, critic, reference = build_models(config, tokenizer)
    model = PolicyAndCritic(policy, critic)
    rollout = sample_replies(model.policy, tokenizer, [[1, 2, 3, 4, 5, 6], [7], [8, 9], [10, 11, 12]], config, CPU,
                             seed=0)
    ids, attention, positions, width = rollout.micro(torch.arange(4))
    assert (attention[:, 0] == 0).any()  # the batch is left-padded
    # The plain 2-D mask gives left padding empty rows: the situation this test guards against.
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    plain = reference(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    assert any(not mask.any(dim=-1).all() for mask in masks)
    masks.clear()
    score_rollout(model, reference, rollout, config, CPU)
    logits, values, _ = model(ids, attention, positions, width)
    (token_logprobs(logits, ids[:, -width:], 0.8).sum() + values.sum()).backward()
    monkeypatch.undo()
    assert masks and all(mask.dtype == torch.bool and mask.any(dim=-1).all() for mask in masks)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    real = rollout.reply_mask.bool()[:, :width]
    expected = token_logprobs(plain[:, -width - 1:-1], ids[:, -width:], 0.8)
    assert torch.allclose(rollout.ref_logprobs[:, :width][real], expected[real], atol=1e-5)


def test_sampling_from_broken_logits_is_one_error_not_a_device_assert(make_run):
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    model = AutoModelForCausalLM.from_pretrained(make_run / "sft")
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(PipelineError, match="eval: sft: the model's logits turned NaN or infinite while sampling"):
        generate_reply_ids(model, tokenizer, ["hello", "how are you today?"], 4, do_sample=True, what="eval: sft")
    config = PPOStageConfig(max_new_tokens=4, generation_batch_size=2)
    with pytest.raises(PipelineError, match="^ppo: the model's logits turned NaN"):
        sample_replies(model, tokenizer, [[1, 2, 3], [4]], config, Compute(CPU_DEVICE, "bf16"), seed=0)


@pytest.mark.parametrize("failure", ["out of memory", "CUDA error", "other"])
def test_accelerator_failures_are_one_line_with_the_log_kept(failure, capsys):
    def main(argv):
        if failure == "out of memory":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
        if failure == "CUDA error":
            raise torch.AcceleratorError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
        raise RuntimeError("a bug of ours")

    if failure == "other":  # programming errors keep their traceback
        with pytest.raises(RuntimeError, match="a bug of ours"):
            run_cli(main, [], stage="ppo", batch_options="micro_batch_size")
        return
    with pytest.raises(SystemExit) as exited:
        run_cli(main, [], stage="ppo", batch_options="micro_batch_size or generation_batch_size")
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ppo: ")
    if failure == "out of memory":
        assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in lines[0]
        assert "lower micro_batch_size or generation_batch_size" in lines[0]
    else:
        log = lines[0].split("full log in ")[1].split(";")[0]
        with open(log) as handle:
            assert "Traceback" in handle.read()


def test_more_processes_than_gpus_is_one_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PipelineError, match="2 processes on this machine but 1 GPU"):
        common.distributed.start_processes()


def test_ppo_logs_the_gpu_memory_high_water_mark_on_a_gpu_only(monkeypatch):
    from ppo.train import peak_memory

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * 2 ** 29)
    assert peak_memory(Compute(torch.device("cuda", 0), "bf16")) == {"memory/peak_allocated_gib": 1.5}
    assert asked == [torch.device("cuda", 0)]
    assert peak_memory(CPU) == {}
