"""Rollouts: sample a reply to each prompt, then record the policy's and the reference's log-probs, the
critic's values and the entropy of every reply token."""

import contextlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.modeling import pad_sequences
from common.precision import Compute
from common.sampling import sample
from ppo.config import PPOStageConfig
from ppo.core import token_logprobs, token_logprobs_and_entropy
from ppo.models import PolicyAndCritic, reply_logits
from ppo.top_blocks import Start, kept_input_of_block


@dataclass
class Rollout:
    """One batch of episodes. Sequences are [left-padded prompt | right-padded reply]; the prompt part is
    `context` wide, and reply-aligned tensors ([episodes, reply width]) are zero past each reply's end."""
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    context: int
    reply_mask: torch.Tensor
    finished: torch.Tensor
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    # With trainable_layers: each network's lowest trained block and the input of that block on every episode
    # ([episodes, columns, hidden], as scoring saw it), from which learning runs the top blocks only.
    starts: tuple[Start, Start] | None = None

    def columns(self, rows: torch.Tensor) -> tuple[slice, int]:
        """The columns the rows need (all-padding columns cut off: cheaper forwards) and the reply width kept (the
        reply fills the last columns)."""
        reply_width = max(int(self.reply_mask[rows].sum(dim=1).max()), 1)
        prompt_width = int(self.attention_mask[rows, :self.context].sum(dim=1).max())
        return slice(self.context - prompt_width, self.context + reply_width), reply_width

    def micro(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The rows' sequences in their columns: ids, mask, position ids and the reply width."""
        columns, reply_width = self.columns(rows)
        ids, mask = self.sequences[rows, columns], self.attention_mask[rows, columns]
        # Positions count real tokens only, as `generate` counted them under left padding.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids, mask, positions, reply_width

    def micro_starts(self, rows: torch.Tensor) -> tuple[Start, Start] | None:
        """The rows' kept block inputs in the same columns as `micro`'s ids (None when none were kept)."""
        if self.starts is None:
            return None
        columns, _ = self.columns(rows)
        (policy_block, policy_kept), (critic_block, critic_kept) = self.starts
        return (policy_block, policy_kept[rows, columns]), (critic_block, critic_kept[rows, columns])


def pad_right(rows: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    return torch.nn.functional.pad(rows, (0, width - rows.shape[1]), value=value)


# Rollout tensors feed the losses later, so they are made under no_grad, not inference_mode (autograd
# refuses to save inference tensors for backward).
@torch.no_grad()
def sample_replies(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                   config: PPOStageConfig, compute: Compute, seed: int) -> Rollout:
    """Sample one reply per prompt in chunks of generation_batch_size; cut each after its first EOS. Chunk
    k is sampled from seed + its first row: when the caller numbers rows globally, the replies do not
    depend on how many processes share the batch (a 2-process run samples what 1 process samples)."""
    # Left padding: every prompt ends, and every reply starts, at column `context`.
    prompts, prompt_mask = pad_sequences(prompt_ids, tokenizer.pad_token_id, left=True)
    device = compute.device
    prompts, prompt_mask, context = prompts.to(device), prompt_mask.to(device), prompts.shape[1]
    chunks = []
    policy.eval()
    for start in range(0, len(prompt_ids), config.generation_batch_size):
        rows = slice(start, start + config.generation_batch_size)
        torch.manual_seed(seed + start)
        with compute.autocast():
            chunks.append(sample(policy, prompts[rows], prompt_mask[rows], config.max_new_tokens,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id, config.temperature,
                                 config.generation_backend, what="ppo"))
    policy.train()
    width = max(chunk.tokens.shape[1] for chunk in chunks)
    replies = torch.cat([pad_right(chunk.tokens, width, tokenizer.pad_token_id) for chunk in chunks])
    # Lengths, not a pad-id test, mark the reply: the model may sample the pad token's id as an ordinary token.
    lengths = torch.cat([chunk.lengths for chunk in chunks])
    reply_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    return Rollout(torch.cat([prompts, replies], dim=1), torch.cat([prompt_mask, reply_mask], dim=1), context,
                   reply_mask.float(), torch.cat([chunk.finished for chunk in chunks]))


@torch.no_grad()
def score_rollout(model: PolicyAndCritic, reference: PreTrainedModel | None, rollout: Rollout,
                  config: PPOStageConfig, compute: Compute, keep_from: tuple[int, int] | None = None) -> None:
    """Fill in the policy's and reference's log-probs and the critic's values, a chunk at a time. Policy and
    reference run under the same autocast on the same micro-batches: identical weights give identical
    log-probs, so the KL penalty of the first update is exactly 0 in every precision. With `keep_from` (the
    policy's and the critic's lowest trained block) the inputs of those blocks are kept for learning."""
    logprobs, ref_logprobs, values, entropy = [], [], [], []
    kept = ([], [])
    width = rollout.reply_mask.shape[1]
    for start in range(0, len(rollout.sequences), config.generation_batch_size):
        rows = torch.arange(start, min(start + config.generation_batch_size, len(rollout.sequences)))
        ids, mask, positions, reply_width = rollout.micro(rows)
        targets = ids[:, -reply_width:]
        with compute.autocast(), contextlib.ExitStack() as keeping:
            if keep_from is not None:
                policy_kept, critic_kept = (keeping.enter_context(kept_input_of_block(network, block))
                                            for network, block in zip((model.policy, model.critic), keep_from,
                                                                      strict=True))
            logits, value, _ = model(ids, mask, positions, reply_width)
            # With LoRA the reference is the same network with its adapter switched off: no second copy.
            with model.policy.disable_adapter() if reference is None else contextlib.nullcontext():
                ref_logits = reply_logits(model.policy if reference is None else reference, ids, mask, positions,
                                          reply_width)
        if keep_from is not None:
            # Back to the whole rollout's columns, so that any later choice of rows can cut its own.
            left = rollout.columns(rows)[0].start
            for store, chunk in zip(kept, (policy_kept[0], critic_kept[0]), strict=True):
                store.append(torch.nn.functional.pad(chunk, (0, 0, left, rollout.sequences.shape[1] - left
                                                              - chunk.shape[1])))
        chosen, spread = token_logprobs_and_entropy(logits, targets, config.temperature)
        logprobs.append(pad_right(chosen, width))
        entropy.append(pad_right(spread, width))
        values.append(pad_right(value, width))
        ref_logprobs.append(pad_right(token_logprobs(ref_logits, targets, config.temperature), width))
    mask = rollout.reply_mask
    rollout.logprobs = torch.cat(logprobs) * mask
    rollout.ref_logprobs = torch.cat(ref_logprobs) * mask
    rollout.values = torch.cat(values) * mask
    rollout.entropy = torch.cat(entropy) * mask
    if keep_from is not None:
        rollout.starts = tuple((block, torch.cat(store)) for block, store in zip(keep_from, kept, strict=True))


def reply_token_lists(rollout: Rollout) -> list[list[int]]:
    lengths = rollout.reply_mask.sum(dim=1).long().tolist()
    replies = rollout.sequences[:, rollout.context:]
    return [replies[row, :length].tolist() for row, length in enumerate(lengths)]
