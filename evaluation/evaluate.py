"""Evaluate checkpoints side by side on held-out prompts (README: "Evaluation: `make eval` and the report").

Usage:
    python -m evaluation --config configs/default.yaml                       # base, SFT and PPO of runs/default
    python -m evaluation --checkpoints "sft=runs/default/sft,mine=out/my-policy" --prompts my_prompts.jsonl
    python -m evaluation --config configs/default.yaml --judge mypkg.judges:helpful --reward_model ""
    make eval                          # CHECKPOINTS="name=path,..." EVAL_PROMPTS=file.jsonl for your own

Every checkpoint answers the same prompts with the same sampling seed and settings. Per checkpoint: the
judge's score (the gold judge by default), the reward model's score, the win rate against the reference
checkpoint under both (ties count half), the KL from the reference over whole replies, reply length, EOS
rate, distinct-1/2, and the perplexity of the SFT eval replies; 95% bootstrap intervals over prompts for
means and win rates. Writes `output_dir` (default `$(RUN)/eval/`): `report.md`, `report.json`,
`replies.jsonl` (every reply with its scores), PNG plots and `pipeline.json`.
"""

import math
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from common.checkpoint import (
    StagedOutput,
    fingerprint,
    read_manifest,
    require_checkpoint,
    skip_unchanged,
)
from common.config import parse_config
from common.errors import PipelineError
from common.modeling import (
    decode_replies,
    ensure_distinct_pad,
    generate_reply_ids,
    load_causal_lm,
    load_tokenizer,
    pad_sequences,
)
from common.options import check_generation_backend
from common.precision import Compute
from common.reward import RewardScorer, prompt_input_ids
from data.chat import load_chat_examples
from data.judges import load_judge, run_judge
from data.prompts import load_prompts
from evaluation.config import EvalConfig, parse_checkpoints, parse_rounds, stage_inputs
from evaluation.metrics import distinct_n, mean_with_interval, sequence_kl, win_outcomes
from evaluation.report import print_headline, write_report
from evaluation.rounds import rounds_summary, shift_outcomes


@torch.inference_mode()
def reply_logprobs(model: PreTrainedModel, prompts: list[list[int]], replies: list[list[int]], temperature: float,
                   batch_size: int, compute: Compute) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each reply token under `model` at `temperature` (logits / T, the distribution replies were
    sampled from) and the mask of real reply tokens, padded to the longest reply."""
    width = max(len(reply) for reply in replies) or 1
    logprobs = torch.zeros(len(replies), width)
    model.eval()
    for rows in by_length(prompts, batch_size):
        # Prompts padded on the left and replies on the right: every reply starts at the same column, so
        # the LM head runs only over the reply positions (the 49k-vocabulary head dominates small models).
        prompt_ids, prompt_mask = pad_sequences([prompts[i] for i in rows], 0, left=True)
        reply_ids, reply_mask = pad_sequences([replies[i] for i in rows], 0)
        ids, mask = torch.cat([prompt_ids, reply_ids], 1), torch.cat([prompt_mask, reply_mask], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        device = model.device
        with compute.autocast():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=reply_ids.shape[1] + 1).logits[:, :-1]
        logits = logits.float() / temperature
        token_logprobs = torch.log_softmax(logits, -1).gather(-1, reply_ids.to(device).unsqueeze(-1)).squeeze(-1)
        logprobs[rows, : reply_ids.shape[1]] = token_logprobs.cpu() * reply_mask
    return logprobs, pad_sequences(replies, 0, width=width)[1]


def by_length(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Row indices in batches of prompts of similar length: far less padding to run through the model than
    in file order (held-out prompts range from a few tokens to over a hundred)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def conversation_turns(tokenizer: PreTrainedTokenizerBase, source: str, limit: int) -> tuple[list, list]:
    """From SFT eval conversations: (context ids, last assistant reply ids) pairs for perplexity."""
    contexts, replies = [], []
    for messages in load_chat_examples(source)[:limit]:
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        context = prompt_input_ids(tokenizer, messages[:last])
        text = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if full[: len(context)] == context and len(full) > len(context):
            contexts.append(context[-384:])  # a long history adds cost, not signal: keep its last 384 tokens
            replies.append(full[len(context):])
    if not replies:
        raise PipelineError(f"{source}: no conversation ends in an assistant reply the chat template renders after "
                            "its context; pass --sft_eval_data '' to skip perplexity")
    return contexts, replies


def perplexity(model: PreTrainedModel, turns: tuple[list, list], batch_size: int, compute: Compute) -> float:
    logprobs, mask = reply_logprobs(model, *turns, temperature=1.0, batch_size=batch_size, compute=compute)
    return math.exp(-logprobs.sum().item() / mask.sum().item())


def evaluate_checkpoint(name: str, path: str, reference: PreTrainedModel | None, reference_name: str,
                        tokenizer: PreTrainedTokenizerBase, prompts: list[str], turns: tuple | None,
                        config: EvalConfig, compute: Compute, pair_prompts: int = 0) -> dict:
    """Sample one reply per prompt (fixed seed), then its log-probs under the checkpoint and the reference;
    with `pair_prompts`, a second reply to that many prompts (another seed)."""
    model = reference if name == reference_name else load_causal_lm(path, compute.dtype).to(compute.device)
    prompt_ids = [prompt_input_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    ids = sample_replies(model, tokenizer, prompts, prompt_ids, config, compute, config.seed, name)
    texts, finished = decode_replies(tokenizer, ids)
    result = {
        "replies": texts,
        "finished": finished,
        "lengths": [len(reply) for reply in ids],
        "kl": None,
        "perplexity": perplexity(model, turns, config.batch_size, compute) if turns else None,
    }
    if name == reference_name:
        result["kl"] = [0.0] * len(ids)
    elif reference is not None and any(ids):
        own, mask = reply_logprobs(model, prompt_ids, ids, config.temperature, config.batch_size, compute)
        ref, _ = reply_logprobs(reference, prompt_ids, ids, config.temperature, config.batch_size, compute)
        result["kl"] = sequence_kl(own, ref, mask)
    if pair_prompts:  # a second reply to the first prompts: pairs from this policy for the shift table
        second = sample_replies(model, tokenizer, prompts[:pair_prompts], prompt_ids[:pair_prompts], config, compute,
                                config.seed + 1, f"{name} (second reply)")
        second_texts, second_finished = decode_replies(tokenizer, second)
        result["second"] = {"replies": second_texts, "finished": second_finished}
    return result


def sample_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   prompt_ids: list[list[int]], config: EvalConfig, compute: Compute, seed: int,
                   name: str) -> list[list[int]]:
    """One sampled reply per prompt (token ids), prompts batched by length, from a fixed seed."""
    set_seed(seed)
    ids = [[] for _ in prompts]
    for rows in tqdm(by_length(prompt_ids, config.batch_size), desc=f"eval: {name}", unit="batch"):
        with compute.autocast():
            replies = generate_reply_ids(model, tokenizer, [prompts[i] for i in rows], config.max_new_tokens,
                                         do_sample=True, temperature=config.temperature, what=f"eval: {name}",
                                         backend=config.generation_backend)
        for row, reply in zip(rows, replies, strict=True):
            ids[row] = reply
    return ids


def run_stage_seconds(run: Path) -> dict[str, float]:
    """What each stage of the run cost: the folders next to the reference (and in its round<r>/ folders) that
    hold one of our manifests, evaluations aside, in the order they ran (the cost side of the report)."""
    folders = [folder for folder in sorted(run.iterdir()) if folder.is_dir()] if run.is_dir() else []
    folders += [sub for folder in folders if folder.name.startswith("round") for sub in sorted(folder.iterdir())
                if sub.is_dir()]
    manifests = [(str(folder.relative_to(run)), read_manifest(folder)) for folder in folders]
    done = sorted((m["started"], name, m["seconds"]) for name, m in manifests
                  if m and "seconds" in m and m.get("stage") != "eval")
    return {name: seconds for _, name, seconds in done}


def lend_chat_template(tokenizer: PreTrainedTokenizerBase, path: str, reference: str) -> PreTrainedTokenizerBase:
    """A pretrained model without a chat template (the `base` row) is asked in the reference's format, as
    plain text where its vocabulary lacks the template's tokens. It only samples, so EOS pads it: a pad token
    its tokenizer class adds by default (Qwen2's `<|endoftext|>`) may lie beyond the model's embeddings."""
    if tokenizer.chat_template:
        return ensure_distinct_pad(tokenizer, path)
    tokenizer.chat_template = load_tokenizer(reference).chat_template
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def training_cost(path: str) -> dict:
    """The stage that trained a checkpoint and its wall time, and that of the reward model it learnt against."""
    manifest = read_manifest(path) or {}
    reward_model = manifest.get("inputs", {}).get("reward_model", {}).get("path")
    return {"stage": manifest.get("stage"), "seconds": manifest.get("seconds"),
            "reward_model_seconds": (read_manifest(reward_model) or {}).get("seconds") if reward_model else None}


def summarise(results: dict[str, dict], reference: str, config: EvalConfig) -> dict[str, dict]:
    """Means with 95% bootstrap intervals, win rates against the reference, and the protocol's other numbers."""
    def with_interval(values: list[float]) -> dict:
        return mean_with_interval(values, config.bootstrap_resamples, config.seed)

    summary = {}
    for name, result in results.items():
        row = {"path": result["path"], "gold": with_interval(result["gold"]),
               "length": statistics.fmean(result["lengths"]),
               "eos_rate": statistics.fmean(result["finished"]),
               "distinct_1": distinct_n(result["replies"], 1), "distinct_2": distinct_n(result["replies"], 2),
               "perplexity": result["perplexity"], "training": training_cost(result["path"])}
        row["kl"] = with_interval(result["kl"]) if result["kl"] is not None else None
        row["rm"] = with_interval(result["rm"]) if result["rm"] is not None else None
        if name != reference:
            row["win_gold"] = with_interval(win_outcomes(result["gold"], results[reference]["gold"]))
            if result["rm"] is not None:
                row["win_rm"] = with_interval(win_outcomes(result["rm"], results[reference]["rm"]))
        summary[name] = row
    return summary


def main(argv: list[str] | None = None) -> None:
    config = parse_config(EvalConfig, "eval", argv)
    checkpoints = parse_checkpoints(config.checkpoints, config.reference)
    rounds = parse_rounds(config.rounds, checkpoints)
    inputs = stage_inputs(config)
    print_ = fingerprint(config, inputs)
    if skip_unchanged("eval", config, print_):
        print_headline(Path(config.output_dir))
        return

    # Validate everything before the long sampling runs: checkpoints, prompts, judge, reward model, SFT data.
    if config.temperature <= 0:
        raise PipelineError(f"temperature must be above 0 (replies are sampled), got {config.temperature}")
    check_generation_backend(config.generation_backend)
    tokenizers = {name: lend_chat_template(load_tokenizer(path, chat=False), path, checkpoints[config.reference])
                  for name, path in checkpoints.items()}
    prompts = load_prompts(config.prompts, config.prompt_column)
    prompts = prompts[: config.num_prompts] if config.num_prompts else prompts
    compute = Compute.choose(config.precision)
    judge = load_judge(config.judge, compute)
    scorer = RewardScorer.load(config.reward_model, compute, config.batch_size) if config.reward_model else None
    for name, path in rounds.items():
        require_checkpoint(path, f"reward model of {name}", "pass --rounds name=<its reward-model folder>")
    reference_tokenizer = tokenizers[config.reference]
    turns = (conversation_turns(reference_tokenizer, config.sft_eval_data, config.max_perplexity_examples)
             if config.sft_eval_data else None)
    output = StagedOutput(config.output_dir, "eval")
    staging = output.open()

    print(f"eval: {', '.join(checkpoints)} on {len(prompts)} prompts from {config.prompts} "
          f"(T {config.temperature}, {config.max_new_tokens} tokens, seed {config.seed}); judge {config.judge}; "
          f"{compute.device}, {compute.precision}")
    reference = load_causal_lm(checkpoints[config.reference], compute.dtype).to(compute.device)
    results = {}
    for name, path in checkpoints.items():
        tokenizer = tokenizers[name]
        comparable = same_vocabulary(tokenizer, reference_tokenizer)
        pair_prompts = config.shift_prompts if rounds and (name in rounds or name == config.reference) else 0
        result = evaluate_checkpoint(name, path, reference if comparable else None, config.reference, tokenizer,
                                     prompts, turns if comparable else None, config, compute, pair_prompts)
        result["path"] = path
        result["gold"] = run_judge(judge, config.judge, prompts, result["replies"], result["finished"])
        if "second" in result:
            second = result["second"]
            second["gold"] = run_judge(judge, config.judge, prompts[: len(second["replies"])], second["replies"],
                                       second["finished"])
        result["rm"] = scorer.judge(prompts, result["replies"], result["finished"]) if scorer else None
        results[name] = result
        print(f"eval: {name}: gold {statistics.fmean(result['gold']):.3f}, length "
              f"{statistics.fmean(result['lengths']):.1f}, EOS {statistics.fmean(result['finished']):.0%}")

    summary = summarise(results, config.reference, config)
    shift = shift_outcomes(rounds, results, prompts, compute, config.batch_size, config.shift_min_margin)
    rm_metrics = (read_manifest(config.reward_model) or {}).get("metrics", {}) if config.reward_model else {}
    report = {
        "prompts": config.prompts, "num_prompts": len(prompts), "reference": config.reference,
        "judge": config.judge, "reward_model": config.reward_model or None,
        "rm_heldout_accuracy": rm_metrics.get("eval_accuracy"), "rm_heldout_pairs": rm_metrics.get("eval_pairs"),
        "sampling": {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens, "seed": config.seed},
        "checkpoints": summary,
        "stage_seconds": run_stage_seconds(Path(checkpoints[config.reference]).parent),
    }
    if rounds:
        report["rounds"] = rounds_summary(rounds, results, shift, config.bootstrap_resamples, config.seed)
    write_report(staging, report, results, prompts, config.num_samples)
    final = output.commit(config, inputs, {"checkpoints": summary}, print_)
    print_headline(final)
