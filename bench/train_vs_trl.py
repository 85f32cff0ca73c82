"""SFT and reward-model training throughput: our stages (`python -m sft`, `python -m reward_model`, run as a
user runs them) against a plain trl script doing the same work (bench/plain_trl.py, the same trl).

Called by bench/run_all.py. Both sides get the same model, the same examples (SFT: chitchat conversations;
RM: one chosen/rejected pair per distinct prompt, so our per-prompt grouping and trl's pairs batch the same
sequences), max_length, batch size, steps and learning rate, fp32, no gradient checkpointing, no evaluation
or checkpoints during training. Only examples that fit max_length whole are used, so neither side truncates
or drops any, and steps x batch size = the examples: exactly one epoch.

Tokens per second = non-padding tokens of the tokenized training set (each goes through the model once in
the epoch) / the trainer's own `train_runtime` (the `train()` call: no loading, tokenizing or saving; the
evaluation our SFT stage runs inside it, at step 0, is subtracted). Each side counts its own tokenization:
trl's dataset in the plain script, our stage's for ours (SFT: trl's chat-template tokenization, which our stage
uses too; RM: `reward_model.grouped.tokenize_groups`, one token per sequence fewer than trl's template, which
adds a newline after the end-of-turn token).
"""

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from flops import training_flops_per_token
from harness import ROOT, WORK, medians, peak_rss_of

SOURCE = WORK / "data" / "sft_train.jsonl"  # the tiny config's chitchat split; the same text for both models


@dataclass
class TrainingBench:
    name: str
    stage: str  # "sft" or "rm"
    config: str  # our stage's YAML; every option that shapes the work is passed explicitly on top of it
    model: str
    max_length: int
    batch_size: int
    steps: int
    learning_rate: float
    seed: int = 0

    @property
    def examples(self) -> int:
        return self.batch_size * self.steps

    def path(self, split: str) -> str:
        return str(WORK / f"{self.name}_{split}.jsonl")


def conversations() -> list[list[dict]]:
    with SOURCE.open() as handle:
        return [json.loads(line)["messages"] for line in handle]


def fitting_examples(tokenizer, max_length: int, count: int) -> list[list[dict]]:
    """The first `count` conversations whose whole chat-template rendering fits `max_length` tokens."""
    fitting = (m for m in conversations() if len(chat_ids(tokenizer, m)) <= max_length)
    return [next(fitting) for _ in range(count)]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def preference_pairs(tokenizer, max_length: int, count: int) -> list[dict]:
    """Synthetic pairs, one per distinct prompt: a conversation's first user turn, its own first reply as
    chosen and the next conversation's first reply as rejected. Only the compute matters here, not the labels."""
    from common.reward import reward_input_ids

    chats = conversations()
    pairs, seen = [], set()
    for chat, following in zip(chats, chats[1:], strict=False):
        prompt, chosen, rejected = chat[0]["content"], chat[1]["content"], following[1]["content"]
        messages = [{"role": "user", "content": prompt}]
        # Strictly shorter: trl's tokenization of the same pair is one token longer (see above).
        fits = all(len(reward_input_ids(tokenizer, messages, reply)) < max_length for reply in (chosen, rejected))
        if prompt not in seen and chosen != rejected and fits:
            seen.add(prompt)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if len(pairs) == count:
            return pairs
    sys.exit(f"bench: only {len(pairs)} preference pairs fit {max_length} tokens; {count} needed")


def write_jsonl(path: str, rows: list) -> None:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def prepare(bench: TrainingBench, tokenizer) -> int:
    """Training and (small, for our stage's before/after evaluation) eval files; the training tokens our stage
    will see."""
    if bench.stage == "sft":
        examples = fitting_examples(tokenizer, bench.max_length, bench.examples + 8)
        write_jsonl(bench.path("train"), [{"messages": m} for m in examples[:bench.examples]])
        write_jsonl(bench.path("eval"), [{"messages": m} for m in examples[bench.examples:]])
        return sum(len(chat_ids(tokenizer, m)) for m in examples[:bench.examples])
    from data.preferences import load_preference_pairs
    from reward_model.grouped import tokenize_groups

    pairs = preference_pairs(tokenizer, bench.max_length, bench.examples + 4)
    write_jsonl(bench.path("train"), pairs[:bench.examples])
    write_jsonl(bench.path("eval"), pairs[bench.examples:])
    groups = tokenize_groups(load_preference_pairs(bench.path("train"), {}, 0.0), tokenizer, bench.max_length, "train")
    return sum(len(sequence) for row in groups["sequences"] for sequence in row)


def our_command(bench: TrainingBench, output_dir: str) -> list[str]:
    shared = ["--config", bench.config, "--model", bench.model, "--data", bench.path("train"),
              "--eval_data", bench.path("eval"), "--output_dir", output_dir, "--max_length", str(bench.max_length),
              "--per_device_train_batch_size", str(bench.batch_size), "--gradient_accumulation_steps", "1",
              "--max_steps", str(bench.steps), "--learning_rate", str(bench.learning_rate),
              "--logging_steps", str(bench.steps), "--eval_steps", "0", "--save_steps", "0", "--peft_method", "none",
              "--gradient_checkpointing", "false", "--seed", str(bench.seed), "--force", "true"]
    if bench.stage == "sft":
        # Before/after evaluation and sample replies are outside the timed train() call; kept small for wall time.
        return [sys.executable, "-m", "sft", *shared, "--max_train_examples", "0", "--max_eval_examples", "8",
                "--num_sample_prompts", "1", "--max_new_tokens", "4"]
    return [sys.executable, "-m", "reward_model", *shared, "--max_train_pairs", "0", "--max_eval_pairs", "4",
            "--trainable_layers", "0", "--head_learning_rate", "0", "--norm_responses", "8"]


def check_one_epoch(bench: TrainingBench, side: str, examples: int, steps: int) -> None:
    if (examples, steps) != (bench.examples, bench.steps):
        sys.exit(f"bench: {bench.name} {side} trained {examples} examples in {steps} steps, expected "
                 f"{bench.examples} in {bench.steps}: the work is no longer the same")


def evaluation_in_train(metrics_file: Path) -> float:
    """Seconds our stage spent evaluating inside train() (SFT measures the base model there, at step 0): the
    rows logged before the train_runtime row. The plain script evaluates nothing, so they come off our time."""
    seconds = 0.0
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if "train_runtime" in row:
            break
        seconds += row.get("eval_runtime", 0.0)
    return seconds


def ours(bench: TrainingBench, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        _, peak = peak_rss_of(our_command(bench, f"{folder}/out"))
        metrics = json.loads((Path(folder) / "out" / "pipeline.json").read_text())["metrics"]
        evaluating = evaluation_in_train(Path(folder) / "out" / "metrics.jsonl")
    examples = metrics["train_examples"] if bench.stage == "sft" else metrics["train_pairs"]
    check_one_epoch(bench, "ours", examples, metrics["steps"])
    seconds = metrics["train_seconds"] - evaluating
    return {"tokens": tokens, "train_seconds": seconds, "evaluation_in_train_seconds": evaluating,
            "tokens_per_second": tokens / seconds, "peak_mib": peak}


def plain_trl(bench: TrainingBench, pad_token: str) -> dict:
    settings = {**asdict(bench), "train": bench.path("train"), "logging_steps": bench.steps, "pad_token": pad_token}
    stdout, peak = peak_rss_of([sys.executable, str(ROOT / "bench" / "plain_trl.py"), json.dumps(settings)])
    result = json.loads(stdout.strip().splitlines()[-1])
    check_one_epoch(bench, "plain trl", result["examples"], result["steps"])
    return {"tokens": result["tokens"], "train_seconds": result["seconds"],
            "tokens_per_second": result["tokens"] / result["seconds"], "peak_mib": peak}


def benchmark(bench: TrainingBench, repeats: int) -> dict:
    """`repeats` alternating runs of ours and plain trl: settings, runs, medians, ratios, FLOPs per token."""
    from common.modeling import load_tokenizer

    tokenizer = load_tokenizer(bench.model)
    tokens = prepare(bench, tokenizer)
    print(f"bench: {bench.name}, {repeats} repeats x {bench.steps} steps x {bench.batch_size} "
          f"{'examples' if bench.stage == 'sft' else 'pairs'}, ours against plain trl")
    runs = {"ours": [], "trl": []}
    for repeat in range(repeats):
        runs["ours"].append(ours(bench, tokens))
        runs["trl"].append(plain_trl(bench, tokenizer.pad_token))
        print(f"  repeat {repeat + 1}: ours {runs['ours'][-1]}, plain trl {runs['trl'][-1]}")
    median = {side: medians(side_runs, ("tokens_per_second", "peak_mib")) for side, side_runs in runs.items()}
    flops_per_token = training_flops_per_token(bench.model, reward_model=bench.stage == "rm")
    for side in median.values():
        side["flops_per_second"] = flops_per_token * side["tokens_per_second"]
    return {
        "settings": asdict(bench), "runs": runs, "median": median, "flops_per_token": flops_per_token,
        "speed_ratio": median["ours"]["tokens_per_second"] / median["trl"]["tokens_per_second"],
        "memory_ratio": median["ours"]["peak_mib"] / median["trl"]["peak_mib"],
    }
