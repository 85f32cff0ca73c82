"""SFT's options (`python -m sft --help` lists them) and what its output depends on: light enough to find the
output up to date before the training libraries load."""

from dataclasses import dataclass, field
from typing import Any

from common.checkpoint import describe_input, describe_parent
from common.options import TrainerOptions


@dataclass
class SFTStageConfig(TrainerOptions):
    model: str = field(default="runs/default/base", metadata={"help": "base model: a folder or hub id"})
    data: str = field(default="runs/default/data/sft_train.jsonl", metadata={"help": "SFT data file/folder/hub"})
    eval_data: str = field(default="", metadata={"help": "eval data; empty: hold out eval_fraction of data"})
    output_dir: str = field(default="runs/default/sft", metadata={"help": "where the checkpoint is written"})
    columns: str = field(default="", metadata={"help": "column mapping, e.g. messages=conversations"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (longer ones are truncated)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of data held out when no eval_data"})
    max_train_examples: int = field(default=0, metadata={"help": "use at most this many (0: all)"})
    max_eval_examples: int = field(default=200, metadata={"help": "evaluate on at most this many (0: all)"})
    num_sample_prompts: int = field(default=3, metadata={"help": "eval prompts answered into the manifest"})
    max_new_tokens: int = field(default=48, metadata={"help": "length of those sample answers"})
    chat_template: str = field(default="auto", metadata={
        "help": "auto: the model's own template if assistant-only loss can use it (trl patches known ones), else "
                "ChatML (a pretrained model has none); chatml; or a Jinja file with trl's generation markers"})


def stage_inputs(config: SFTStageConfig) -> dict[str, Any]:
    inputs = {"model": describe_parent(config.model), "data": describe_input(config.data)}
    if config.eval_data:
        inputs["eval_data"] = describe_input(config.eval_data)
    return inputs
