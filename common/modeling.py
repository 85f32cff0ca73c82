"""Loading models and tokenizers the same way in every stage."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.checkpoint import require_checkpoint
from common.errors import PipelineError

# SmolLM2's own ChatML template with trl's `{% generation %}` markers around each assistant reply and its
# `<|im_end|>`, so assistant-only loss trains the model to stop. It renders exactly the same text as the
# original template; trl cannot patch this template itself.
CHATML_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def choose_precision(requested: str) -> str:
    """`auto` picks bf16 on a GPU that supports it, fp16 on other GPUs and fp32 on the CPU (no bf16 there)."""
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise PipelineError(f"precision must be auto, fp32, bf16 or fp16, got {requested!r}")
    if requested != "auto":
        if requested != "fp32" and not torch.cuda.is_available():
            raise PipelineError(f"precision {requested} needs a GPU; use precision: auto or fp32 on the CPU")
        return requested
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    require_checkpoint(path, "model", "run `make base` or pass BASE_MODEL=<path or hub id>")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    return ensure_distinct_pad(tokenizer, path)


def ensure_distinct_pad(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad token equal to EOS hides the real end of each sequence from the loss and from
        # reward read-out; use an existing distinct token rather than growing the vocabulary.
        candidates = [t for t in ("<|endoftext|>", "<pad>", "<unk>", tokenizer.unk_token) if t]
        vocab = tokenizer.get_vocab()
        distinct = [t for t in candidates if t in vocab and vocab[t] != tokenizer.eos_token_id]
        if not distinct:
            raise PipelineError(f"tokenizer of {source} has no pad token distinct from EOS; add one to the tokenizer")
        tokenizer.pad_token = distinct[0]
    return tokenizer


def load_causal_lm(path: str) -> PreTrainedModel:
    """A causal LM in fp32 (the trainer casts for mixed precision), dropout as the checkpoint has it."""
    require_checkpoint(path, "model", "run `make base` or pass BASE_MODEL=<path or hub id>")
    # An absolute path, so a LoRA adapter saved from this model records a base that loads from anywhere.
    local = Path(path).expanduser()
    try:
        return AutoModelForCausalLM.from_pretrained(str(local.resolve()) if local.exists() else path,
                                                    dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load a causal LM from {path}: {str(err).splitlines()[0]}") from None


@torch.no_grad()
def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """Chat replies to single-turn prompts: left-padded batch, KV cache, stop at EOS."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    was_training = model.training
    model.eval()
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature if do_sample else None, top_k=None, top_p=None,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
