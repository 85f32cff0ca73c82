"""PPO's data: the training and held-out prompts, and the SFT batches of PPO-ptx."""

import torch
from transformers import PreTrainedTokenizerBase

from common.errors import PipelineError
from common.modeling import pad_sequences
from common.reward import prompt_input_ids
from data.chat import load_chat_examples
from data.prompts import load_prompts
from ppo.config import PPOStageConfig


def tokenized_prompts(source: str, column: str, tokenizer: PreTrainedTokenizerBase,
                      max_prompt_length: int) -> tuple[list[str], list[list[int]]]:
    """A prompt file's prompts and their ids through the chat template, with one error for every prompt over
    max_prompt_length (PPO and RLOO read their prompts alike)."""
    prompts = load_prompts(source, column)
    ids = [prompt_input_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    too_long = [row for row, prompt in enumerate(ids, start=1) if len(prompt) > max_prompt_length]
    if too_long:
        raise PipelineError(f"{source}: {len(too_long)} prompt(s) longer than max_prompt_length "
                            f"{max_prompt_length} tokens with the chat template (rows "
                            f"{', '.join(map(str, too_long[:5]))}{' ...' if len(too_long) > 5 else ''}); "
                            "shorten them or raise max_prompt_length")
    return prompts, ids


def load_prompt_split(config: PPOStageConfig, tokenizer) -> tuple[list[str], list[list[int]], list[str], list]:
    """Training prompts and the held-out evaluation prompts (the file's last num_eval_prompts), tokenized."""
    prompts, ids = tokenized_prompts(config.prompts, config.prompt_column, tokenizer, config.max_prompt_length)
    if len(prompts) <= config.num_eval_prompts:
        raise PipelineError(f"{config.prompts}: {len(prompts)} prompts, but {config.num_eval_prompts} are held out for "
                            "evaluation and the rest train; add prompts or lower num_eval_prompts")
    split = len(prompts) - config.num_eval_prompts
    return prompts[:split], ids[:split], prompts[split:], ids[split:]


def ptx_batches(config: PPOStageConfig, tokenizer: PreTrainedTokenizerBase, seed: int):
    """Endless micro-batches of SFT examples with labels on the assistant's tokens only (-100 elsewhere)."""
    limit = config.max_prompt_length + config.max_new_tokens
    encoded = []
    for messages in load_chat_examples(config.ptx_data):
        item = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
        ids, keep = item["input_ids"][:limit], item["assistant_masks"][:limit]
        if any(keep):
            encoded.append((ids, [t if k else -100 for t, k in zip(ids, keep, strict=True)]))
    if not encoded:
        raise PipelineError(f"{config.ptx_data}: no example has assistant tokens within {limit} tokens; PPO-ptx "
                            "needs a chat template with {% generation %} markers and assistant replies")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator)[:config.micro_batch_size].tolist()
        ids, mask = pad_sequences([encoded[i][0] for i in order], tokenizer.pad_token_id)
        labels, _ = pad_sequences([encoded[i][1] for i in order], -100)
        yield ids, mask, labels
