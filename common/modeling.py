"""Loading models and tokenizers the same way in every stage."""

from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from common.adapters import prompt_learning_adapter
from common.checkpoint import require_checkpoint
from common.errors import PipelineError
from common.sampling import sample

NEW_PAD_TOKEN = "<|pad|>"


def load_tokenizer(path: str, chat: bool = True) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, which must have a chat template and gets a pad distinct from EOS; with
    `chat` off, as it is (SFT gives a pretrained model both, evaluation lends it the reference's template)."""
    require_checkpoint(path, "model", "run `make base` or pass BASE_MODEL=<path or hub id>")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if not chat:
        return tokenizer
    if not tokenizer.chat_template:
        raise PipelineError(f"{path} has no chat template (a pretrained model): run SFT on it first "
                            f"(`make sft BASE_MODEL={path}` gives it one)")
    return ensure_distinct_pad(tokenizer, path)


def ensure_distinct_pad(tokenizer: PreTrainedTokenizerBase, source: str,
                        add_missing: bool = False) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad token equal to EOS hides the real end of each sequence from the loss and from
        # reward read-out; use an existing distinct token rather than growing the vocabulary.
        candidates = [t for t in ("<|endoftext|>", "<pad>", "<unk>", "</s>", tokenizer.unk_token) if t]
        vocab = tokenizer.get_vocab()
        distinct = [t for t in candidates if t in vocab and vocab[t] != tokenizer.eos_token_id]
        if distinct:
            tokenizer.pad_token = distinct[0]
        elif add_missing:  # SFT, which grows the embeddings to match
            tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
        else:
            raise PipelineError(f"tokenizer of {source} has no pad token distinct from EOS; run SFT on it first "
                                "(it adds one) or add one to the tokenizer")
    return tokenizer


def pad_sequences(sequences: list[list[int]], pad_id: int, left: bool = False,
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids, attention mask) tensors padded to `width` (default: the longest), on the
    right, or on the left so that every sequence ends at the last column."""
    width = width or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def local_or_hub(path: str) -> str:
    """An absolute path for local folders, so a LoRA adapter saved from the model records a base that loads
    from anywhere; hub ids pass through."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM, dropout as the checkpoint has it: in fp32 to train (the trainer casts for mixed precision),
    in the compute dtype (`Compute.dtype`) to only run forward."""
    require_checkpoint(path, "model", "run `make base` or pass BASE_MODEL=<path or hub id>")
    # transformers loads weight adapters (LoRA, IA3) itself; a prompt-learning one needs peft's wrapper.
    load = AutoPeftModelForCausalLM if prompt_learning_adapter(path) else AutoModelForCausalLM
    try:
        return load.from_pretrained(local_or_hub(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load a causal LM from {path}: {str(err).splitlines()[0]}") from None


def load_reward_model(path: str, pad_token_id: int, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A one-logit sequence classifier: a reward model, or a causal LM given a new scalar head to train (dtype as
    for `load_causal_lm`)."""
    require_checkpoint(path, "model", "run the stage that writes it first (`make sft` or `make rm`)")
    if prompt_learning_adapter(path):
        raise PipelineError(f"{path} is a prefix/p_tuning/prompt adapter, which cannot be merged into whole weights; "
                            "a reward model starts from whole weights: run SFT with peft_method none, lora, adalora "
                            "or ia3, or start the reward model from the base model")
    # Starting from a causal LM, transformers warns that the new `score` head is untrained: that is the point.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(local_or_hub(path), num_labels=1,
                                                                   dtype=dtype)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load a reward model from {path}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # The classifier reads its score at the last token that is not padding, found through this id.
    model.config.pad_token_id = pad_token_id
    return model


def block_holder(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module holding the transformer blocks and the attribute they sit in: the first ModuleList in the order
    the model registers its modules (Llama's `model.layers`, GPT-2's `transformer.h`)."""
    name = next(name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList))
    parent, _, attribute = name.rpartition(".")
    return model.get_submodule(parent), attribute


def freeze_lower_blocks(model: torch.nn.Module, trainable: int) -> int:
    """Freeze everything below the top `trainable` blocks (token and position embeddings, lower blocks); the top
    blocks, the final norm and the head train. Returns the trainable parameter count.

    Backpropagation then stops at the lowest trainable block, so a step costs little more than a forward
    pass: on a CPU this buys several times more preference pairs per minute, and sentiment-like judgements
    live in the top layers' features anyway.
    """
    blocks = getattr(*block_holder(model))
    if not 0 < trainable <= len(blocks):
        raise PipelineError(f"trainable_layers must be from 1 to {len(blocks)} (the model's blocks), got {trainable}")
    # Parameters come in the order the model registers its modules: embeddings, blocks, final norm, head.
    # Everything before the first trained block is frozen, so GPT-2's position table (wpe) is frozen too.
    first_trained = next(blocks[len(blocks) - trainable].parameters())
    for parameter in model.parameters():
        if parameter is first_trained:
            break
        parameter.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def in_policy_dtypes(model: torch.nn.Module, frozen_dtype: torch.dtype) -> torch.nn.Module:
    """Trained parameters in fp32, where the precision policy keeps what an optimizer updates (a bf16 weight would
    round most small updates away): adapters, a classifier head peft copies to train, the top blocks. Frozen ones
    (an adapter's base, the blocks below `trainable_layers`) in the compute dtype: autocast caches its bf16 copy
    of a trained weight, but casts a frozen fp32 weight again at every forward, so sampling 32 tokens re-cast 22 of
    the default's 30 blocks 32 times and ran slower than fp32 on the CPU. With fp32 compute this changes nothing."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else frozen_dtype)
    return model


def stored_like(reference: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference laid out parameter by parameter like the model it is compared with (fp32 where that
    trains, the compute dtype where it is frozen): the same weights then give the same log-probs, bit for bit,
    and a KL penalty or DPO's implicit reward starts at exactly 0."""
    for mine, theirs in zip(reference.parameters(), model.parameters(), strict=True):
        mine.data = mine.data.to(theirs.dtype)
    return reference


@torch.inference_mode()
def generate_reply_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                       num_return_sequences: int = 1, what: str = "generate",
                       backend: str = "eager") -> list[list[int]]:
    """Token ids of chat replies to single-turn prompts (left-padded batch, KV cache), each cut after its
    first EOS (kept) or at `max_new_tokens`. Replies to prompt i are rows i*n .. i*n+n-1. Callers choose the
    number format (`Compute.autocast`); `what` names the caller in the error about broken logits."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    was_training = model.training
    model.eval()
    replies = sample(model, batch["input_ids"].repeat_interleave(num_return_sequences, dim=0),
                     batch["attention_mask"].repeat_interleave(num_return_sequences, dim=0), max_new_tokens,
                     tokenizer.eos_token_id, tokenizer.pad_token_id, temperature if do_sample else 0.0, backend, what)
    model.train(was_training)
    return [row[:length] for row, length in zip(replies.tokens.tolist(), replies.lengths.tolist(), strict=True)]


def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                     num_return_sequences: int = 1, what: str = "generate",
                     backend: str = "eager") -> tuple[list[str], list[bool]]:
    """`generate_reply_ids` as text, and whether each reply ended with EOS (False: cut off at the limit)."""
    return decode_replies(tokenizer, generate_reply_ids(model, tokenizer, prompts, max_new_tokens, do_sample,
                                                        temperature, num_return_sequences, what, backend))


def decode_replies(tokenizer: PreTrainedTokenizerBase, replies: list[list[int]]) -> tuple[list[str], list[bool]]:
    """Reply ids from `generate_reply_ids` -> their text and whether each ended with EOS."""
    finished = [bool(reply) and reply[-1] == tokenizer.eos_token_id for reply in replies]
    return tokenizer.batch_decode(replies, skip_special_tokens=True), finished
