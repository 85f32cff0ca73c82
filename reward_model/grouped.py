"""InstructGPT's batching for reward models, on trl's RewardTrainer: all comparisons of one prompt form one
batch element, and each distinct reply goes through the model once.

A ranking of K replies gives K*(K-1)/2 pairs. Trained as separate pairs, every reply is scored K-1 times
per epoch and the pairs of one prompt land in different batches; InstructGPT (Ouyang et al. 2022, sec. 3.5)
groups them instead: one forward pass per reply, the loss averaged over the prompt's comparisons. At K=4
an epoch costs 4 forward passes per prompt instead of 12, and the model no longer overfits to replies it
has already seen in other pairs. A plain pair file is a group of two replies with one comparison.
"""

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from trl import RewardTrainer

from common.errors import PipelineError
from common.modeling import pad_sequences
from common.reward import reward_input_ids
from data.preferences import PreferencePair


def group_by_prompt(pairs: list[PreferencePair]) -> list[dict[str, Any]]:
    """Pairs sharing a prompt -> one group: its distinct replies and (better, worse, margin) comparisons."""
    groups: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key = "\n".join(f"{m['role']}:{m['content']}" for m in pair.prompt)
        group = groups.setdefault(key, {"prompt": pair.prompt, "replies": {}, "comparisons": []})
        better = group["replies"].setdefault((pair.chosen, pair.chosen_finished), len(group["replies"]))
        worse = group["replies"].setdefault((pair.rejected, pair.rejected_finished), len(group["replies"]))
        group["comparisons"].append((better, worse, pair.margin))
    return list(groups.values())


def tokenize_groups(pairs: list[PreferencePair], tokenizer, max_length: int, split: str) -> Dataset:
    """Token ids built exactly as `common.reward` builds them at scoring time; comparisons with a reply
    longer than max_length are dropped (and replies left in no comparison with them)."""
    rows, dropped = [], 0
    for group in group_by_prompt(pairs):
        sequences = [reward_input_ids(tokenizer, group["prompt"], reply, done) for reply, done in group["replies"]]
        kept = [c for c in group["comparisons"] if max(len(sequences[c[0]]), len(sequences[c[1]])) <= max_length]
        dropped += len(group["comparisons"]) - len(kept)
        used = sorted({index for better, worse, _ in kept for index in (better, worse)})
        if not kept:
            continue
        position = {index: new for new, index in enumerate(used)}
        rows.append({"sequences": [sequences[i] for i in used], "better": [position[c[0]] for c in kept],
                     "worse": [position[c[1]] for c in kept], "margin": [float(c[2]) for c in kept]})
    if dropped:
        print(f"rm: dropped {dropped} of {len(pairs)} {split} pairs longer than max_length {max_length} tokens")
    if not rows:
        raise PipelineError(f"every {split} pair is longer than max_length {max_length} tokens; raise it")
    return Dataset.from_list(rows)


@dataclass
class GroupCollator:
    """Groups -> one right-padded batch of their replies, with global indices of each comparison's replies
    and a weight of 1/(comparisons in its group), so every prompt counts the same."""
    pad_token_id: int

    def __call__(self, groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, better, worse, margin, weight = [], [], [], [], []
        for group in groups:
            offset, count = len(sequences), len(group["better"])
            sequences += group["sequences"]
            better += [offset + i for i in group["better"]]
            worse += [offset + i for i in group["worse"]]
            margin += group["margin"]
            weight += [1.0 / count] * count
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "better": torch.tensor(better),
                "worse": torch.tensor(worse), "margin": torch.tensor(margin), "weight": torch.tensor(weight)}


def grouped_loss(rewards: torch.Tensor, batch: dict[str, torch.Tensor], use_margin: bool) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_better - r_worse [- margin]), averaged within each prompt, then
    over prompts."""
    difference = rewards[batch["better"]] - rewards[batch["worse"]]
    if use_margin:
        difference = difference - batch["margin"]
    return -(torch.nn.functional.logsigmoid(difference) * batch["weight"]).sum() / batch["weight"].sum()


class GroupedRewardTrainer(RewardTrainer):
    """trl's RewardTrainer (its loop, logging, saving, LoRA handling) with grouped batches and loss."""

    def __init__(self, *args, use_margin: bool = False, **kwargs):
        self.use_margin = use_margin
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized into groups by `tokenize_groups`

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["sequences", "better", "worse", "margin"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        loss = grouped_loss(rewards, inputs, self.use_margin)
        if self.args.center_rewards_coefficient:
            loss = loss + self.args.center_rewards_coefficient * (rewards ** 2).mean()
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            difference = rewards[inputs["better"]] - rewards[inputs["worse"]]
            self._metrics[mode]["accuracy"].append((difference > 0).float().mean().item())
            self._metrics[mode]["margin"].append(difference.mean().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
        return (loss, outputs) if return_outputs else loss
