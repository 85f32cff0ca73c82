"""Build the base model `common.base_model` writes (the stage's model side, apart so that an unchanged base stage
is passed without loading torch and transformers)."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from common.base_model import GGUF_FILE, BaseConfig
from common.chat_template import chatml_template
from common.modeling import ensure_distinct_pad

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def embedded_tokenizer(folder: Path):
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer.chat_template = chatml_template(SMOLLM_SYSTEM)  # SmolLM2's own, with generation markers
    return tokenizer


def dequantized_smollm2(folder: Path) -> LlamaForCausalLM:
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
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


def write_base_model(config: BaseConfig, gguf: Path, folder: Path) -> int:
    """Model and tokenizer into `folder`; the number of parameters."""
    tokenizer = ensure_distinct_pad(embedded_tokenizer(gguf), GGUF_FILE)
    model = dequantized_smollm2(gguf) if config.source == "smollm2" else tiny_model(config, len(tokenizer), tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())
