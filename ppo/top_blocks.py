"""Learning from where the frozen blocks end.

With `trainable_layers: N` (and no adapter) the blocks below the top N never change during a run, so their output
on a rollout's sequences is the same at every learning pass over it. Scoring the rollout keeps the input of the
lowest trained block, for the policy and for the critic; each learning forward then runs only the top N blocks from
there, skipping the frozen blocks' forward that the two epochs would otherwise repeat. That works for models whose
backbone hands `inputs_embeds` to the first block unchanged (Llama, Qwen, Mistral, SmolLM2; not GPT-2, which adds
position embeddings to it, nor Gemma, which scales it): `resumes_exactly` checks it on the models themselves.
"""

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from common.modeling import block_holder
from common.precision import Compute

# A block's index and the hidden states entering that block, [rows, columns, hidden].
Start = tuple[int, torch.Tensor]


def lowest_trained_block(model: torch.nn.Module) -> int:
    """The index of the lowest block with a trained parameter (0 when everything trains or an adapter sits in
    every block: nothing to skip)."""
    holder, attribute = block_holder(model)
    blocks = getattr(holder, attribute)
    return next(index for index, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters()))


@contextlib.contextmanager
def kept_input_of_block(model: torch.nn.Module, index: int) -> Iterator[list[torch.Tensor]]:
    """Inside, every forward of the model appends the hidden states entering block `index` to the list."""
    holder, attribute = block_holder(model)
    kept: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        kept.append(args[0] if args else kwargs["hidden_states"])

    handle = getattr(holder, attribute)[index].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield kept
    finally:
        handle.remove()


@contextlib.contextmanager
def forward_inputs(model: torch.nn.Module, input_ids: torch.Tensor, start: Start | None) -> Iterator[dict]:
    """The token inputs of a forward of `model` run inside: its ids, or with `start` (a block's index and the kept
    input of that block) that input as `inputs_embeds`, and only the blocks from there up run."""
    if start is None:
        yield {"input_ids": input_ids}
        return
    holder, attribute = block_holder(model)
    blocks = getattr(holder, attribute)
    setattr(holder, attribute, torch.nn.ModuleList(list(blocks)[start[0]:]))
    try:
        yield {"inputs_embeds": start[1]}
    finally:
        setattr(holder, attribute, blocks)


@torch.no_grad()
def resumes_exactly(model: PreTrainedModel, index: int, compute: Compute) -> bool:
    """Whether the backbone's top blocks run from a kept block input give its own output, on a short sequence."""
    model = getattr(model, model.base_model_prefix)
    ids = torch.arange(1, 9, device=compute.device)[None, :]
    with compute.autocast():
        with kept_input_of_block(model, index) as kept:
            whole = model(input_ids=ids, use_cache=False)[0]
        with forward_inputs(model, ids, (index, kept[0])) as tokens:
            resumed = model(**tokens, use_cache=False)[0]
    return torch.allclose(whole.float(), resumed.float(), rtol=1e-4, atol=1e-5)
