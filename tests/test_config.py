from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from common.config import parse_config, parse_mapping
from common.errors import PipelineError


@dataclass
class Example:
    rate: float = 1.0
    steps: int = 3
    name: str = "x"
    columns: str = ""


def test_yaml_section_then_command_line_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stage:\n  rate: 0.5\n  steps: 7\n  columns: {messages: conv}\nother:\n  rate: 9\n")
    parsed = parse_config(Example, "stage", ["--config", str(config), "--steps", "11"])
    assert (parsed.rate, parsed.steps, parsed.name) == (0.5, 11, "x")
    assert parse_mapping(parsed.columns, "columns") == {"messages": "conv"}


def test_overlay_section_replaces_the_stage_section_and_the_command_line_wins(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stage:\n  rate: 0.5\n  steps: 7\nround_stage:\n  steps: 2\n  name: r\n")
    parsed = parse_config(Example, "stage", ["--config", str(config), "--overlay", "round_stage", "--name", "cli"])
    assert (parsed.rate, parsed.steps, parsed.name) == (0.5, 2, "cli")
    # A config without the overlay section runs on the stage's own section.
    assert parse_config(Example, "stage", ["--config", str(config), "--overlay", "absent"]).steps == 7
    config.write_text("stage:\n  rate: 0.5\nround_stage:\n  stpes: 2\n")
    with pytest.raises(PipelineError, match=r"unknown option\(s\) stpes in section 'round_stage'"):
        parse_config(Example, "stage", ["--config", str(config), "--overlay", "round_stage"])
    with pytest.raises(PipelineError, match="pass --config too"):
        parse_config(Example, "stage", ["--overlay", "round_stage"])


def test_unknown_yaml_option_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stage:\n  rte: 0.5\n")
    with pytest.raises(PipelineError, match=r"unknown option\(s\) rte in section 'stage'"):
        parse_config(Example, "stage", ["--config", str(config)])


def test_invalid_yaml_names_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stage:\n  rate: [1,\n")
    with pytest.raises(PipelineError, match=r"c.yaml:\d+:\d+: invalid YAML"):
        parse_config(Example, "stage", ["--config", str(config)])


def test_unknown_command_line_argument():
    with pytest.raises(PipelineError, match="--nope"):
        parse_config(Example, "stage", ["--nope", "1"])


def test_mapping_forms():
    assert parse_mapping("messages=conv, prompt=q", "columns") == {"messages": "conv", "prompt": "q"}
    assert parse_mapping('{"text": "dialogue"}', "columns") == {"text": "dialogue"}
    with pytest.raises(PipelineError, match="name=column"):
        parse_mapping("messages", "columns")


@pytest.mark.parametrize("module", ["sft", "reward_model", "ppo", "data.collect", "evaluation", "reward_model.score",
                                    "data.chitchat", "common.base_model", "data.annotate"])
def test_every_stage_lists_its_options(module, capsys):
    # argparse %-formats help texts: a bare "%" in one of them turned `--help` into a traceback.
    from tests.conftest import run_in_process

    assert run_in_process(module, "--help") == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_parses_in_every_stage(config):
    """A typo in a shipped config's option would only show when a user reaches that stage (the GPU config runs
    in no test): every section, round overlays included, must build its stage's options."""
    from common.base_model import BaseConfig
    from data.chitchat import ChitchatConfig
    from data.collect import CollectConfig
    from dpo.config import DPOStageConfig
    from evaluation.config import EvalConfig
    from ppo.config import PPOStageConfig
    from reward_model.config import RewardStageConfig
    from rloo.config import RLOOStageConfig
    from sft.config import SFTStageConfig

    stages = {"base": BaseConfig, "data": ChitchatConfig, "sft": SFTStageConfig, "prefs": CollectConfig,
              "rm": RewardStageConfig, "ppo": PPOStageConfig, "dpo": DPOStageConfig, "rloo": RLOOStageConfig,
              "eval": EvalConfig}
    sections = yaml.safe_load(config.read_text())
    assert set(sections) <= {*stages, "round_rm", "round_ppo"}
    for section, config_type in stages.items():
        assert parse_config(config_type, section, ["--config", str(config)]) is not None
    for overlay, section in (("round_rm", "rm"), ("round_ppo", "ppo")):
        if overlay in sections:
            parse_config(stages[section], section, ["--config", str(config), "--overlay", overlay])
