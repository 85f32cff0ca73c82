"""Parameter-efficient fine-tuning: one option, `peft_method`, in every stage that trains (SFT, RM, PPO).

    method    peft config                              what trains                                 saved as
    lora      LoraConfig                               low-rank updates of the target linears      merged
    adalora   AdaLoraConfig                            LoRA in SVD form; ranks move to where they  merged
                                                       matter most during training
    ia3       IA3Config                                scales of keys, values, feed-forward        merged
    prefix    PrefixTuningConfig(projection on)        virtual keys/values in every layer, through adapter
                                                       an MLP (Li & Liang's prefix tuning)
    p_tuning  PrefixTuningConfig(projection off)       virtual keys/values in every layer, learned adapter
                                                       directly (P-tuning v2)
    prompt    PromptTuningConfig                       virtual token embeddings at the input only  adapter

The prompt-learning methods (prefix, p_tuning, prompt) change what the model attends to, not its weights,
so they cannot be merged: their checkpoint is base model + adapter, which `common.modeling.load_causal_lm`
reads through peft.
"""

import json
import math
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from transformers import PreTrainedModel, TrainerCallback

from common.errors import PipelineError
from common.options import AdapterOptions, check_peft_method

PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")  # their peft_type in adapter_config.json


def target_modules(text: str) -> str | list[str]:
    return text if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def peft_config(options: AdapterOptions, model: PreTrainedModel, task_type: str, stage: str,
                refused: dict[str, str], total_steps: int, new_tokens: list[int] | None = None,
                dropout: float | None = None) -> PeftConfig | None:
    """The peft config for `options.peft_method` in `stage`, or None for full fine-tuning. `refused` maps the
    methods this stage cannot take to why; `new_tokens` are ids the chat template added (their embedding rows
    must train); `total_steps` is AdaLoRA's schedule."""
    method = options.peft_method
    check_peft_method(method, stage, refused)
    if new_tokens and method not in ("none", "lora", "adalora"):
        raise PipelineError(f"{stage}: the chat template added {len(new_tokens)} token(s) to the tokenizer, whose "
                            f"embeddings must train, and {method} cannot train them: use lora, adalora or none, or a "
                            "base model whose tokenizer already has the template's tokens")
    if new_tokens and not options.merge:
        raise PipelineError(f"{stage}: the chat template added {len(new_tokens)} token(s), so the base model's "
                            "embeddings no longer fit the tokenizer and a kept adapter could not load on it; keep "
                            "merge: true")
    if method == "none":
        return None
    dropout = options.lora_dropout if dropout is None else dropout
    if method in ("lora", "adalora"):
        lora = dict(lora_alpha=options.lora_alpha, lora_dropout=dropout,
                    target_modules=target_modules(options.lora_target_modules), task_type=task_type,
                    **(new_token_training(model, new_tokens) if new_tokens else {}))
        if method == "lora":
            return LoraConfig(r=options.lora_r, **lora)
        # Three phases: warm up at the initial rank, move rank to where it matters, then hold the ranks still.
        return AdaLoraConfig(init_r=options.lora_r, target_r=max(1, options.lora_r // 2), total_step=total_steps,
                             tinit=total_steps // 10, tfinal=total_steps // 5, **lora)
    if method == "ia3":
        return IA3Config(task_type=task_type)
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type=task_type)
    return PrefixTuningConfig(num_virtual_tokens=options.num_virtual_tokens, prefix_projection=method == "prefix",
                              encoder_hidden_size=model.config.hidden_size, task_type=task_type)


def start_prefix_from_tokens(model: PeftModel, token_ids: torch.Tensor) -> None:
    """Set a P-tuning v2 prefix (prefix tuning without the MLP) to the keys and values the model itself computes
    for `token_ids`, so training starts as if those real tokens preceded every prompt. peft's default, N(0, 1)
    keys and values, is noise far larger than real ones: on SmolLM2 it lifted the eval loss before any step
    from 4.36 to 8.42, and 64 steps did not win it back."""
    encoder = model.prompt_encoder[model.active_adapter]
    with torch.no_grad():
        cache = model.get_base_model()(input_ids=token_ids[None].to(model.device), use_cache=True).past_key_values
        # peft reads a prefix row as [layer 0 keys, layer 0 values, layer 1 keys, ...], each heads x head_dim.
        rows = [tensor[0].transpose(0, 1).flatten(1) for layer in cache.layers for tensor in (layer.keys, layer.values)]
        encoder.embedding.weight.copy_(torch.cat(rows, dim=1))


def new_token_training(model: PreTrainedModel, token_ids: list[int]) -> dict:
    """LoRA options that train the embedding rows of new tokens (`trainable_token_indices`) and, when the output
    layer is not tied to them, the whole output layer: a new end-of-turn token needs its own logit to ever be
    sampled, and peft's token-row training does not reach an untied output layer."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    options = {"trainable_token_indices": {names[id(embeddings)]: list(token_ids)}}
    if output is not None and output.weight is not embeddings.weight:
        options["modules_to_save"] = [names[id(output)]]
    return options


def allocate_adapter_rank(model: torch.nn.Module, step: int) -> None:
    """AdaLoRA moves rank between layers by each step's gradients: call between the optimizer step and
    zero_grad. Any other model is left alone."""
    if isinstance(model, PeftModel) and isinstance(model.peft_config.get("default"), AdaLoraConfig):
        model.base_model.update_and_allocate(step)


class AdaLoraBudget(TrainerCallback):
    """`allocate_adapter_rank` at every optimizer step of a trl/transformers trainer."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        allocate_adapter_rank(model, state.global_step)


def planned_steps(examples: int, per_device_batch: int, processes: int, accumulation: int, epochs: float,
                  max_steps: int) -> int:
    """Optimizer steps the trainer will take: AdaLoRA's schedule needs the number before training starts."""
    if max_steps > 0:
        return max_steps
    batches = math.ceil(examples / (per_device_batch * processes))
    return max(1, math.ceil(batches / accumulation * epochs))


def prompt_learning_adapter(path: str | Path) -> bool:
    """Whether `path` holds a prompt-learning adapter (prefix, p_tuning, prompt) rather than whole weights."""
    config = Path(path) / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("peft_type") in PROMPT_LEARNING_TYPES
