"""What PPO needs in GPU memory for models of real sizes, full fine-tune and LoRA, under the precision policy
(README, "Precision and the GPU"): an estimate, not a measurement, made without a GPU and without weights.

Usage:
    python bench/ppo_memory.py                                  # the table for the shapes below, the default PPO sizes
    python bench/ppo_memory.py --micro_batch_size 4 --seq_len 512 --output bench/ppo_memory.json
    make bench-memory

Each shape's policy, critic, reference and reward model are built on the meta device (no memory) from a
transformers config, the adapters by the same `peft_config` the PPO stage uses, and each parameter is counted in
the dtype the stage stores it in: frozen models and frozen blocks in bf16, trained weights (and a full
fine-tune's reference where its policy trains) fp32, adapters fp32, plus an fp32 gradient and AdamW's two fp32
moments for every trained parameter. Those bytes are exact. The activations of one learning micro-batch are
counted per token and block from a SwiGLU decoder's saved tensors (policy and critic; no gradient checkpointing;
SDPA keeps no attention matrix): a rough figure, and CUDA's allocator adds its own slack on top. A GPU run
must confirm the totals.
"""

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig, Qwen2Config

from common.adapters import peft_config
from common.modeling import freeze_lower_blocks
from ppo.config import PPO_REFUSED, PPOStageConfig

# Qwen2.5's published shapes (hidden, blocks, heads, key/value heads, MLP width, vocabulary, tied embeddings).
SHAPES = {
    "0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "7B": (3584, 28, 28, 4, 18944, 152064, False),
}
GIB = 2 ** 30


def shape_config(name: str) -> PretrainedConfig:
    hidden, blocks, heads, kv_heads, mlp, vocab, tied = SHAPES[name]
    return Qwen2Config(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab,
                       tie_word_embeddings=tied, pad_token_id=0)


def stored_bytes(model: torch.nn.Module, frozen_bytes: int) -> tuple[int, int]:
    """Bytes of the weights as PPO stores them, and the bytes of the trained ones' gradient and AdamW moments."""
    weights = state = 0
    for parameter in model.parameters():
        trained = parameter.requires_grad
        weights += parameter.numel() * (4 if trained else frozen_bytes)
        state += 12 * parameter.numel() if trained else 0
    return weights, state


def adapted(model, config: PPOStageConfig, method: str, task: str):
    options = dataclasses.replace(config, peft_method=method)
    return get_peft_model(model, peft_config(options, model, task, "ppo", PPO_REFUSED, 1, dropout=0.0))


def estimate(config: PPOStageConfig, model_config: PretrainedConfig, seq_len: int) -> dict:
    """GiB of weights, gradients + AdamW state and activations of one PPO setup: the models `build_models` builds,
    in the dtypes it stores them in, and the reward model as `RewardScorer` holds it."""
    model_config = copy.deepcopy(model_config)
    model_config.num_labels = 1  # the critic's and the reward model's one-logit head
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(model_config)
        critic = AutoModelForSequenceClassification.from_config(model_config)
        reward_model = AutoModelForSequenceClassification.from_config(model_config)
        if config.uses_adapter():
            policy = adapted(policy, config, config.peft_method, "CAUSAL_LM")
        elif config.trainable_layers:
            freeze_lower_blocks(policy, config.trainable_layers)
        if config.critic_peft_method != "none":
            critic = adapted(critic, config, config.critic_peft_method, "SEQ_CLS")
        elif config.trainable_layers:
            freeze_lower_blocks(critic, config.trainable_layers)
    # What is frozen in bf16 (an adapter's base, the blocks below trainable_layers), what trains in fp32; a full
    # fine-tune's reference stored like its policy.
    policy_weights, policy_state = stored_bytes(policy, 2)
    critic_weights, critic_state = stored_bytes(critic, 2)
    reference = 0 if config.uses_adapter() else policy_weights
    rm_weights = 2 * sum(p.numel() for p in reward_model.parameters())
    hidden, mlp = model_config.hidden_size, model_config.intermediate_size
    # Per token and block: about 12 hidden-wide and 4 MLP-wide bf16 tensors kept for backward, and the fp32
    # inputs of the two RMSNorms; twice (policy and critic).
    per_token = model_config.num_hidden_layers * (2 * (12 * hidden + 4 * mlp) + 2 * 4 * hidden)
    activations = 2 * per_token * config.micro_batch_size * seq_len
    # The log-softmax over the vocabulary of the reply positions, fp32, with its gradient.
    logits = 2 * 4 * config.micro_batch_size * (config.max_new_tokens + 1) * model_config.vocab_size
    parts = {"weights": policy_weights + critic_weights + reference + rm_weights,
             "gradients_and_adamw": policy_state + critic_state, "activations": activations + logits}
    return {**{key: value / GIB for key, value in parts.items()}, "total": sum(parts.values()) / GIB,
            "parameters": sum(p.numel() for p in reward_model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro_batch_size", type=int, default=PPOStageConfig.micro_batch_size)
    parser.add_argument("--max_new_tokens", type=int, default=PPOStageConfig.max_new_tokens)
    parser.add_argument("--seq_len", type=int, default=160, help="prompt + reply tokens of a learning micro-batch")
    parser.add_argument("--output", default="bench/ppo_memory.json")
    args = parser.parse_args()
    setups = {"full fine-tune": {}, "LoRA policy and critic": {"peft_method": "lora", "critic_peft_method": "lora"}}
    rows = []
    for shape in SHAPES:
        for setup, options in setups.items():
            config = PPOStageConfig(micro_batch_size=args.micro_batch_size, max_new_tokens=args.max_new_tokens,
                                    **options)
            rows.append({"shape": shape, "setup": setup, **estimate(config, shape_config(shape), args.seq_len)})
    print(f"PPO memory estimate (GiB), bf16 compute, micro-batch {args.micro_batch_size} x {args.seq_len} tokens")
    # An 80 GB card shows about 79 GiB; CUDA's context and the allocator's fragmentation take several of them.
    print("| shape | setup | weights | gradients + AdamW | activations | total | fits 80 GB (total under 70 GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['shape']} | {row['setup']} | {row['weights']:.1f} | {row['gradients_and_adamw']:.1f} | "
              f"{row['activations']:.1f} | {row['total']:.1f} | {'yes' if row['total'] < 70 else 'no'} |")
    Path(args.output).write_text(json.dumps({"estimate": True, "options": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
