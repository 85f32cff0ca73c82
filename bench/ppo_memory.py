"""What PPO holds in memory for models of real sizes, full fine-tune and LoRA, under the precision policy
(README, "Precision and the GPU"): traced on the CPU without weights, not measured on a GPU.

Usage:
    python bench/ppo_memory.py                                  # the table for the shapes below, the default PPO sizes
    python bench/ppo_memory.py --micro_batch_size 4 --seq_len 512 --output bench/ppo_memory.json
    make bench-memory

Each shape's policy, critic, reference and reward model are built from a transformers config, laid out by PPO's own
`for_ppo` (the adapters, the frozen blocks and their dtypes, the reference like the policy), and given fake tensors
(torch's FakeTensorMode: shapes, dtypes and lifetimes, no data, no arithmetic). Then PPO's own modules run on them
while `LiveBytes` counts the bytes of every tensor alive: two optimizer steps of learning (each over the
micro-batches of one minibatch: the policy and critic forward in bf16 autocast, `token_logprobs`, `ppo_losses`,
backward, gradient clipping, AdamW) and the rollout's forwards (policy with its KV cache over the whole sequence,
reference, critic, reward model, without gradients). The peaks count every tensor PyTorch makes, each rounded up to
the 512 bytes of CUDA's smallest block; a GPU adds what this cannot see: CUDA's context, cuBLAS and attention
workspaces, the allocator's fragmentation, and kernels that differ from the CPU's (attention on the CPU may keep its
score matrix, flash attention does not).
"""

import argparse
import contextlib
import copy
import json
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig, Qwen2Config

from ppo.config import PPOStageConfig
from ppo.core import ppo_losses, token_logprobs
from ppo.models import PolicyAndCritic, for_ppo, reply_logits

# Qwen2.5's published shapes (hidden, blocks, heads, key/value heads, MLP width, vocabulary, tied embeddings).
SHAPES = {
    "0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "7B": (3584, 28, 28, 4, 18944, 152064, False),
}
GIB = 2 ** 30
COMPUTE = torch.bfloat16
BLOCK = 512  # CUDA's caching allocator rounds every allocation up to a multiple of 512 bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storage that ops create inside it, alive now and at most: an op's outputs are counted
    when they appear and uncounted when their storage is freed. Fake tensors have sizes and lifetimes, no data.
    The weights of `held` are not counted, also when an optimizer writes into them."""

    def __init__(self, held: list[torch.nn.Module]):
        super().__init__()
        self.live = self.peak = 0
        self.counted = WeakIdKeyDictionary()
        for tensor in (t for model in held for t in [*model.parameters(), *model.buffers()]):
            self.counted[tensor.untyped_storage()] = None

    def free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for storage in (t.untyped_storage() for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            if storage not in self.counted:
                size = -(-storage.nbytes() // BLOCK) * BLOCK
                self.counted[storage] = weakref.finalize(storage, self.free, size)
                self.live += size
        self.peak = max(self.peak, self.live)
        return out


def shape_config(name: str) -> PretrainedConfig:
    hidden, blocks, heads, kv_heads, mlp, vocab, tied = SHAPES[name]
    return Qwen2Config(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab,
                       tie_word_embeddings=tied, pad_token_id=0)


def ppo_models(config: PPOStageConfig, model_config: PretrainedConfig):
    """Policy, critic, reference (None with an adapter: the policy with its adapter off) and reward model, laid out
    by PPO's own `for_ppo` in the dtypes `build_models` and `RewardScorer` give them."""
    model_config = copy.deepcopy(model_config)
    model_config.num_labels = 1  # the critic's and the reward model's one-logit head
    policy, critic, reference = for_ppo(config, AutoModelForCausalLM.from_config(model_config),
                                        AutoModelForSequenceClassification.from_config(model_config),
                                        lambda: AutoModelForCausalLM.from_config(model_config), COMPUTE)
    reward_model = AutoModelForSequenceClassification.from_config(model_config, dtype=COMPUTE).requires_grad_(False)
    return policy, critic, reference, reward_model


def batch(rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.zeros(rows, seq_len, dtype=torch.long)
    return ids, torch.ones_like(ids), torch.arange(seq_len).expand(rows, -1)


def learn(model: PolicyAndCritic, optimizer: torch.optim.Optimizer, config: PPOStageConfig, seq_len: int) -> None:
    """Two optimizer steps as `ppo/train.py` takes them: the first creates AdamW's moments; in the second the
    gradients of earlier micro-batches are alive while the next one's activations are."""
    rows, width = config.micro_batch_size, config.max_new_tokens
    ids, mask, positions = batch(rows, seq_len)
    zeros, reply = torch.zeros(rows, width), torch.ones(rows, width)
    for _ in range(2):
        for _ in range(max(1, config.mini_batch_size // config.micro_batch_size)):
            with torch.autocast("cpu", dtype=COMPUTE):
                logits, values, _ = model(ids, mask, positions, width)
            logprobs = token_logprobs(logits, ids[:, -width:], config.temperature)
            policy_loss, value_loss, _ = ppo_losses(logprobs, zeros, zeros, values, zeros, zeros, reply,
                                                    config.cliprange, config.cliprange_value)
            (policy_loss + config.vf_coef * value_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()


@torch.inference_mode()
def roll_out(model: PolicyAndCritic, reference, reward_model, config: PPOStageConfig, seq_len: int) -> None:
    """A rollout chunk's forwards: the policy's with a KV cache of the whole sequence (what sampling holds at
    its last token), then scoring by policy, reference, critic and reward model."""
    ids, mask, positions = batch(config.generation_batch_size, seq_len)
    width = config.max_new_tokens
    with torch.autocast("cpu", dtype=COMPUTE):
        cache = model.policy(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).past_key_values
        model(ids, mask, positions, width)
        adapter_off = model.policy.disable_adapter() if reference is None else contextlib.nullcontext()
        with adapter_off:
            reply_logits(model.policy if reference is None else reference, ids, mask, positions, width)
        reward_model(input_ids=ids, attention_mask=mask)
    del cache


def as_fake(models: list[torch.nn.Module], mode: FakeTensorMode) -> None:
    """Give every meta parameter and buffer a fake CPU tensor of its shape, dtype and requires_grad, shared ones
    (a tied embedding) shared still. The models are built on the meta device because peft cannot move the
    adapters of a model built as fake tensors."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # holding the meta tensor keeps its id unique
    for module in (m for model in models for m in model.modules()):
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    with mode:
                        empty = torch.empty(tensor.shape, dtype=tensor.dtype)
                    if isinstance(tensor, torch.nn.Parameter):
                        empty = torch.nn.Parameter(empty, tensor.requires_grad)
                    made[id(tensor)] = tensor, empty
                store[name] = made[id(tensor)][1]


def held_bytes(models: list[torch.nn.Module]) -> int:
    """Bytes of the weights (and buffers) of these models, each storage once (a tied embedding is one)."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes()
                for model in models for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def traced(config: PPOStageConfig, model_config: PretrainedConfig, seq_len: int) -> dict:
    """GiB of one PPO setup: its weights, the gradients and AdamW moments of what it trains, and the peak of all
    live tensors in learning and in the rollout."""
    with torch.device("meta"):
        policy, critic, reference, reward_model = ppo_models(config, model_config)
    fake = FakeTensorMode(shape_env=ShapeEnv())  # the shape environment lets `.item()` return a symbol
    as_fake([m for m in (policy, critic, reference, reward_model) if m is not None], fake)
    with fake:
        model = PolicyAndCritic(policy, critic)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-6, eps=config.adam_eps, weight_decay=0.0)
        held = [m for m in (model, reference, reward_model) if m is not None]
        weights = held_bytes(held)
        peaks = {}
        for phase, run in (("learning", lambda: learn(model, optimizer, config, seq_len)),
                           ("rollout", lambda: roll_out(model, reference, reward_model, config, seq_len))):
            with LiveBytes(held) as live:
                run()
            peaks[phase] = live.peak
    # After learning, the AdamW moments and step counters stay; the gradients are freed (zero_grad).
    state = sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values())
    trained_bytes = sum(p.numel() * p.element_size() for p in trained)
    return {"parameters": sum(p.numel() for p in reward_model.parameters()),
            "trained_parameters": sum(p.numel() for p in trained),
            "weights": weights / GIB, "gradients": trained_bytes / GIB, "adamw": state / GIB,
            # The rollout's peak comes on top of the moments, which live from the first step on.
            "learning_peak": (weights + peaks["learning"]) / GIB,
            "rollout_peak": (weights + state + peaks["rollout"]) / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro_batch_size", type=int, default=PPOStageConfig.micro_batch_size)
    parser.add_argument("--mini_batch_size", type=int, default=PPOStageConfig.mini_batch_size)
    parser.add_argument("--generation_batch_size", type=int, default=PPOStageConfig.generation_batch_size)
    parser.add_argument("--max_new_tokens", type=int, default=PPOStageConfig.max_new_tokens)
    parser.add_argument("--seq_len", type=int, default=160, help="prompt + reply tokens of every batch")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of " + ", ".join(SHAPES))
    parser.add_argument("--output", default="bench/ppo_memory.json")
    args = parser.parse_args()
    if args.seq_len <= args.max_new_tokens:
        parser.error(f"--seq_len ({args.seq_len}) must exceed --max_new_tokens ({args.max_new_tokens}): it holds "
                     "the prompt and the reply")
    setups = {"full fine-tune": {}, "LoRA policy and critic": {"peft_method": "lora", "critic_peft_method": "lora"}}
    sizes = {key: getattr(args, key) for key in ("micro_batch_size", "mini_batch_size", "generation_batch_size",
                                                   "max_new_tokens")}
    rows = []
    for shape in args.shapes.split(","):
        for setup, options in setups.items():
            config = PPOStageConfig(**sizes, **options)
            rows.append({"shape": shape, "setup": setup, **traced(config, shape_config(shape), args.seq_len)})
            print(f"{shape} {setup}: learning peak {rows[-1]['learning_peak']:.1f} GiB", flush=True)
    print(f"\nPPO memory traced without weights (GiB), bf16 compute, learning micro-batch {args.micro_batch_size} "
          f"(minibatch {args.mini_batch_size}), rollout chunk {args.generation_batch_size}, {args.seq_len} tokens")
    # An 80 GB card shows about 79 GiB; CUDA's context, workspaces and fragmentation take several of them.
    print("| shape | setup | weights | gradients | AdamW moments | learning peak | rollout peak | "
          "fits 80 GB (peak under 70 GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        peak = max(row["learning_peak"], row["rollout_peak"])
        print(f"| {row['shape']} | {row['setup']} | {row['weights']:.1f} | {row['gradients']:.1f} | "
              f"{row['adamw']:.1f} | {row['learning_peak']:.1f} | {row['rollout_peak']:.1f} | "
              f"{'yes' if peak < 70 else 'no'} |")
    Path(args.output).write_text(json.dumps({"traced": True, "options": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
