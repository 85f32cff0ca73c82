"""The bundled default data: human chit-chat conversations from the `chitchat-dataset` package (MIT).

Usage:
    python -m data.chitchat --config configs/default.yaml --output_dir runs/default/data

Each conversation (two people taking turns) becomes chat examples: the first speaker is the user, the
second the assistant, cut into windows of `turns_per_example` turns. Conversations are assigned to
splits by a hash of their id, so the splits never share a conversation and never change:
  sft_train.jsonl, sft_eval.jsonl       SFT examples and their eval split
  prompts_prefs.jsonl                   prompts for preference collection (stage 2)
  prompts_ppo.jsonl                     prompts for PPO (stage 3)
  prompts_eval.jsonl                    prompts for the final evaluation
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoint import StagedOutput, fingerprint, skip_unchanged
from common.config import parse_config
from common.errors import PipelineError, run_cli

# Buckets of 100 by conversation-id hash: which split a conversation feeds.
SPLITS = {"sft_train": range(0, 76), "sft_eval": range(76, 80), "prompts_prefs": range(80, 90),
          "prompts_ppo": range(90, 95), "prompts_eval": range(95, 100)}


@dataclass
class ChitchatConfig:
    output_dir: str = field(default="runs/default/data", metadata={"help": "folder for the split files"})
    turns_per_example: int = field(default=4, metadata={"help": "turns per SFT example (even: ends on assistant)"})
    min_prompt_chars: int = field(default=8, metadata={"help": "shorter user turns are not used as prompts"})
    max_prompt_chars: int = field(default=200, metadata={"help": "longer user turns are not used as prompts"})
    force: bool = field(default=False, metadata={"help": "rebuild even if the output is up to date"})


def conversations() -> dict[str, list[str]]:
    """Conversation id -> turns, each turn the speaker's consecutive utterances joined."""
    import chitchat_dataset

    path = Path(os.path.dirname(chitchat_dataset.__file__)) / "dataset.json"
    raw = json.loads(path.read_text())
    return {key: [" ".join(u["text"].strip() for u in turn).strip() for turn in conv["messages"]]
            for key, conv in raw.items()}


def bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100


def windows(turns: list[str], size: int) -> list[list[dict[str, str]]]:
    examples = []
    for start in range(0, len(turns), size):
        chunk = turns[start:start + size]
        chunk = chunk[: len(chunk) - len(chunk) % 2]  # end on the assistant's turn
        if chunk and all(chunk):
            examples.append([{"role": "user" if i % 2 == 0 else "assistant", "content": text}
                             for i, text in enumerate(chunk)])
    return examples


def build(config: ChitchatConfig, folder: Path) -> dict[str, int]:
    rows: dict[str, list[dict]] = {name: [] for name in SPLITS}
    prompt_turns: list[tuple[str, str]] = []
    for key, turns in conversations().items():
        split = next(name for name, buckets in SPLITS.items() if bucket(key) in buckets)
        if split.startswith("sft"):
            rows[split].extend({"messages": example} for example in windows(turns, config.turns_per_example))
        else:
            prompt_turns.extend((split, text) for text in turns[0::2])  # what the first speaker, the user, says
    # Short greetings recur across conversations; a prompt the SFT data contains is not held out, so drop it.
    seen = {m["content"] for name in ("sft_train", "sft_eval") for row in rows[name] for m in row["messages"]}
    for split, text in prompt_turns:
        if config.min_prompt_chars <= len(text) <= config.max_prompt_chars and text not in seen:
            seen.add(text)
            rows[split].append({"prompt": text})
    for name, split_rows in rows.items():
        with (folder / f"{name}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in split_rows)
    return {name: len(split_rows) for name, split_rows in rows.items()}


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ChitchatConfig, "data", argv)
    if config.turns_per_example < 2 or config.turns_per_example % 2:
        raise PipelineError(f"turns_per_example must be an even number >= 2, got {config.turns_per_example}")
    inputs = {"chitchat_dataset": "0.9", "splitter": 2}
    print_ = fingerprint(config, inputs)
    if skip_unchanged("data", config, print_):
        return
    output = StagedOutput(config.output_dir, "data")
    counts = build(config, output.open())
    final = output.commit(config, inputs, counts, print_)
    print(f"data: wrote {final}: " + ", ".join(f"{name} {n}" for name, n in counts.items()))


if __name__ == "__main__":
    run_cli(main)
