"""Reward-model scoring, the same for labelling preferences, the RM stage, PPO and evaluation.

A reward model is a one-logit sequence classifier. Its input is the prompt rendered by the chat template
up to the assistant's turn, then the reply's tokens, then EOS only if the reply ended: a reply cut off at
the length limit carries no EOS, so the model can tell it apart. The score is the logit at the last real
token (right padding; the classifier finds that token through `config.pad_token_id`).
"""

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.checkpoint import read_manifest
from common.modeling import load_reward_model, load_tokenizer, pad_sequences
from common.precision import Compute

Message = dict[str, str]


def prompt_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: list[Message]) -> list[int]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reply_input_ids(tokenizer: PreTrainedTokenizerBase, reply: str, finished: bool = True) -> list[int]:
    """A reply's tokens as the policy sampled them: EOS at the end only if it ended there."""
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if finished else ids


def reward_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], reply: str,
                     finished: bool = True) -> list[int]:
    return prompt_input_ids(tokenizer, prompt) + reply_input_ids(tokenizer, reply, finished)


class RewardScorer:
    """Scores (prompt, reply) pairs with a reward model held in memory, on `compute`'s device and number format."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, compute: Compute,
                 batch_size: int = 16):
        self.model, self.tokenizer, self.compute, self.batch_size = model, tokenizer, compute, batch_size

    @classmethod
    def load(cls, path: str, compute: Compute, batch_size: int = 16) -> "RewardScorer":
        tokenizer = load_tokenizer(path)
        model = load_reward_model(path, tokenizer.pad_token_id, compute.dtype).to(compute.device).requires_grad_(False)
        return cls(model, tokenizer, compute, batch_size)

    @staticmethod
    def stored_normalisation(path: str) -> tuple[float, float] | None:
        """The reward mean and std the RM stage measured over its training responses, if recorded."""
        metrics = (read_manifest(path) or {}).get("metrics", {})
        if "reward_mean" in metrics and "reward_std" in metrics:
            return metrics["reward_mean"], metrics["reward_std"]
        return None

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]], progress: str | None = None) -> list[float]:
        # Sorting by length keeps padding (wasted compute) small; scores go back in the input order.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores = [0.0] * len(sequences)
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            chunk = order[start:start + self.batch_size]
            ids, mask = pad_sequences([sequences[i] for i in chunk], self.tokenizer.pad_token_id)
            with self.compute.autocast():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
            for index, value in zip(chunk, logits.float().tolist(), strict=True):
                scores[index] = value
        self.model.train(was_training)
        return scores

    def score(self, prompts: list[list[Message]], replies: list[str], finished: list[bool] | None = None,
              progress: str | None = None) -> list[float]:
        finished = finished if finished is not None else [True] * len(replies)
        sequences = [reward_input_ids(self.tokenizer, prompt, reply, done)
                     for prompt, reply, done in zip(prompts, replies, finished, strict=True)]
        return self.score_ids(sequences, progress)

    def judge(self, prompts: list[str], replies: list[str], finished: list[bool]) -> list[float]:
        """The judge interface of `data.judges`: single-turn prompts as plain strings."""
        return self.score([[{"role": "user", "content": p}] for p in prompts], replies, finished)
