"""Stage configs: a dataclass per stage, a section of a YAML file (`--config`), then command-line overrides.

Every stage reads the same YAML file; each takes its own section (`sft:`, `base:`, ...), so one file
describes a whole run. `--overlay NAME` lays a second section of the file over the stage's own: `make rounds`
trains rounds 2..N with `round_rm:` / `round_ppo:` on top of `rm:` / `ppo:`.
Precedence: dataclass defaults < YAML section < overlay section < command line.
"""

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

from common.checkpoint import fingerprint, skip_unchanged
from common.errors import PipelineError

T = TypeVar("T")


def read_yaml_section(path: str, section: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"config file {path} not found: pass CONFIG=configs/<name>.yaml with an existing file")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise PipelineError(f"{where}: invalid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if not isinstance(loaded, dict):
        raise PipelineError(f"{path}: expected a mapping of sections (sft:, base:, ...), got {type(loaded).__name__}")
    values = loaded.get(section) or {}
    if not isinstance(values, dict):
        raise PipelineError(f"{path}: section '{section}' must be a mapping of option: value")
    return values


def parse_config(config_type: type[T], section: str, argv: list[str] | None = None) -> T:
    """Build `config_type` from `--config FILE` (its `section`) and `--field value` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_type)
    parser.add_argument("--config", default=None, help="YAML file; this stage reads its section of it")
    parser.add_argument("--overlay", default=None, help="a further section of --config whose options replace "
                                                        "this stage's (make rounds: round_rm, round_ppo)")
    known, _ = parser.parse_known_args(argv)
    if known.overlay and not known.config:
        raise PipelineError(f"--overlay {known.overlay} names a section of a config file: pass --config too")
    fields = {f.name for f in dataclasses.fields(config_type)}
    for name in [section, known.overlay] if known.config else []:
        values = read_yaml_section(known.config, name) if name else {}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise PipelineError(
                f"{known.config}: unknown option(s) {', '.join(unknown)} in section '{name}'; "
                f"valid options: {', '.join(sorted(fields))}"
            )
        # Mappings in YAML (e.g. a column mapping) travel as JSON strings, like on the command line.
        parser.set_defaults(**{k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()})
    # The extra options come back as a Namespace between the dataclass and the leftovers.
    config, _namespace, leftover = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if leftover:
        raise PipelineError(f"unknown command-line argument(s): {' '.join(leftover)}; see --help")
    return config


def config_if_up_to_date(config_type: type[T], section: str, inputs: Callable[[T], dict[str, Any]]) -> T | None:
    """What `python -m <stage>` asks before it imports torch and the training libraries (10 s and more on a CPU,
    paid each time `make` passes an unchanged stage): the parsed options when the output is up to date (after
    saying so), else None. A problem with the options is left for the stage itself to report once it has loaded."""
    try:
        config = parse_config(config_type, section)
        return config if skip_unchanged(section, config, fingerprint(config, inputs(config))) else None
    except PipelineError:
        return None


def parse_mapping(text: str | None, option: str) -> dict[str, str]:
    """A mapping given as JSON ('{"a": "b"}') or as 'a=b,c=d'."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise PipelineError(f"--{option}: invalid JSON at column {err.colno}: {err.msg}") from None
    else:
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise PipelineError(f"--{option}: expected name=column pairs separated by commas, got {text!r}")
        mapping = {key.strip(): value.strip() for key, value in pairs}
    return {str(k): str(v) for k, v in mapping.items()}
