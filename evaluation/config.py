"""The evaluation's options (`python -m evaluation --help` lists them), the checkpoints and rounds they name, and
what the report depends on: light enough to find the report up to date before torch and transformers load."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.checkpoint import describe_input, describe_parent
from common.errors import PipelineError
from common.options import generation_backend_option, precision_option


@dataclass
class EvalConfig:
    checkpoints: str = field(default="base=runs/default/base,sft=runs/default/sft,ppo=runs/default/ppo",
                             metadata={"help": "name=path (folder or hub id) pairs, comma-separated, in report order"})
    reference: str = field(default="sft", metadata={"help": "the checkpoint (by name) others are compared with"})
    prompts: str = field(default="runs/default/data/prompts_eval.jsonl",
                         metadata={"help": "held-out prompt file (held apart from preference and PPO prompts)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    judge: str = field(default="data.judges:gold_judge",
                       metadata={"help": "module:function judge, or a reward-model folder"})
    reward_model: str = field(default="runs/default/rm", metadata={"help": "reward model to score with ('' : none)"})
    sft_eval_data: str = field(default="runs/default/data/sft_eval.jsonl",
                               metadata={"help": "SFT eval conversations for perplexity ('' : skip)"})
    output_dir: str = field(default="runs/default/eval", metadata={"help": "where the report is written"})
    num_prompts: int = field(default=256, metadata={"help": "the first N prompts of the file (0: all)"})
    max_new_tokens: int = field(default=32, metadata={"help": "reply length limit (as in PPO)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (as in PPO)"})
    generation_backend: str = generation_backend_option()
    batch_size: int = field(default=16, metadata={"help": "prompts per generate call and per forward pass"})
    max_perplexity_examples: int = field(default=100, metadata={"help": "SFT eval conversations for perplexity"})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "resamples for the 95 percent intervals"})
    num_samples: int = field(default=8, metadata={"help": "prompts whose replies the report shows side by side"})
    rounds: str = field(default="", metadata={"help": "iterated RLHF: name=reward_model pairs, one per round in "
                                                      "order, each name a checkpoint (`make rounds` passes them)"})
    shift_prompts: int = field(default=128, metadata={"help": "rounds: prompts on which the reference and each "
                                                              "round sample a second reply for the shift table"})
    shift_min_margin: float = field(default=0.1, metadata={"help": "rounds: reply pairs whose gold scores differ "
                                                                   "by no more are ties, left out"})
    precision: str = precision_option()
    seed: int = field(default=42, metadata={"help": "sampling seed, the same for every checkpoint"})
    force: bool = field(default=False, metadata={"help": "evaluate again even if the report is up to date"})


def parse_checkpoints(text: str, reference: str) -> dict[str, str]:
    """'name=path,...' (a bare path is named after its folder) -> {name: path}, reference included."""
    checkpoints = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, path = item.split("=", 1) if "=" in item else (Path(item).name, item)
        if name.strip() in checkpoints:
            raise PipelineError(f"--checkpoints names {name.strip()!r} twice; give each checkpoint its own name")
        checkpoints[name.strip()] = path.strip()
    if not checkpoints:
        raise PipelineError("--checkpoints is empty; pass name=path pairs, e.g. sft=runs/x/sft,ppo=runs/x/ppo")
    if reference not in checkpoints:
        raise PipelineError(f"reference {reference!r} is not among the checkpoints ({', '.join(checkpoints)}); "
                            "pass --reference with one of their names")
    return checkpoints


def parse_rounds(text: str, checkpoints: dict[str, str]) -> dict[str, str]:
    """'name=rm_path,...' in round order: each round's policy (a checkpoint name) and the RM it was trained on."""
    rounds = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, reward_model = item.partition("=")
        if name.strip() not in checkpoints or not reward_model.strip():
            raise PipelineError(f"--rounds item {item!r}: each item is name=reward_model_folder with a name from "
                                f"--checkpoints ({', '.join(checkpoints)})")
        rounds[name.strip()] = reward_model.strip()
    return rounds


def stage_inputs(config: EvalConfig) -> dict[str, Any]:
    checkpoints = parse_checkpoints(config.checkpoints, config.reference)
    rounds = parse_rounds(config.rounds, checkpoints)
    inputs = {"checkpoints": {name: describe_parent(path) for name, path in checkpoints.items()},
              "prompts": describe_input(config.prompts),
              **({"round_reward_models": {name: describe_parent(path) for name, path in rounds.items()}}
                 if rounds else {})}
    if config.reward_model:
        inputs["reward_model"] = describe_parent(config.reward_model)
    if config.sft_eval_data:
        inputs["sft_eval_data"] = describe_input(config.sft_eval_data)
    return inputs
