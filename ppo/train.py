"""Stage 3: PPO against the reward model (InstructGPT's third step), our own trainer on `accelerate`.

Usage:
    python -m ppo --config configs/default.yaml                                  # embedded default
    python -m ppo --config configs/default.yaml --prompts my_prompts.jsonl --output_dir runs/mine/ppo
    python -m ppo --config configs/default.yaml --extra_rewards "data.judges:gold_judge=0.5"
    python -m ppo --config configs/default.yaml --peft_method lora               # reference = adapter off
    python -m ppo --config configs/default.yaml --policy runs/default/ppo --reference runs/default/sft \
        --reward_model runs/default/round2/rm --output_dir runs/default/round2/ppo  # a round of `make rounds`
    make ppo NUM_PROCESSES=2                                                     # 2 processes (DDP)
    make ppo ACCELERATE_CONFIG=configs/accelerate/zero3.yaml NUM_PROCESSES=8     # DeepSpeed ZeRO-3
    make ppo                   # after make rm;  make ppo PROMPTS=my_prompts.jsonl for your own prompts

One update (`ppo_update`), as in Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"):
  1. rollout: sample a reply to each prompt of the batch from the policy (left-padded prompts, KV cache,
     temperature T), cut it after its first EOS, and record the policy's and the reference's log-probs of
     logits / T and the critic's value of every reply token;
  2. reward: the reward sources (the RM, plus optional RMs or `module:function` callables, weighted) score
     each reply once; that score lands on the reply's last real token, and every token pays the KL
     penalty kl_coef * (log pi - log pi_ref);
  3. advantages: GAE over the reply tokens, whitened over the batch;
  4. learn: `ppo_epochs` passes over the batch in minibatches; clipped policy loss plus vf_coef times the
     clipped value loss (plus an SFT loss on SFT data with PPO-ptx); one optimizer step per minibatch.

Where the rest lives: `config` (options), `core` (the maths, no model), `models` (policy, critic,
reference), `rollout` (sampling and scoring replies), `top_blocks` (learning from the frozen blocks' kept
output), `rewards` (reward sources), `heldout` (periodic evaluation), `inputs` (prompts, PPO-ptx data),
`checkpoints` (metrics, resume state, final folders).

Writes `output_dir` per the checkpoint contract: the policy (merged, or its adapter with merge: false),
the critic in `value/`, `metrics.jsonl`, TensorBoard logs and `pipeline.json`. Checkpoints of the whole
training state go to `.ppo.partial/resume/` every `save_every` updates; a rerun after a kill resumes there.
"""

import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import GradientAccumulationPlugin
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler, set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from common.adapters import allocate_adapter_rank, prompt_learning_adapter
from common.checkpoint import (
    RESUME,
    StagedOutput,
    describe_parent,
    fingerprint,
    require_checkpoint,
    skip_unchanged,
)
from common.config import parse_config
from common.distributed import open_output, output_bytes, start_processes
from common.errors import PipelineError
from common.modeling import load_tokenizer
from common.precision import Compute, choose_precision
from data.judges import Judge, load_judge
from ppo.checkpoints import MetricsLog, TrainingProgress, resume_point, save_checkpoint, save_final, whole_weights
from ppo.config import PPOStageConfig, stage_inputs, validate
from ppo.core import (
    KLController,
    generalized_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_losses,
    token_logprobs,
    token_rewards,
)
from ppo.heldout import evaluate
from ppo.inputs import load_prompt_split, ptx_batches
from ppo.models import PolicyAndCritic, build_models, check_tokenizers_match
from ppo.rewards import RewardSource, load_reward_sources, score_replies
from ppo.rollout import Rollout, sample_replies, score_rollout
from ppo.top_blocks import lowest_trained_block, resumes_exactly


@dataclass
class PPORun:
    """Everything a run carries from one update to the next."""

    config: PPOStageConfig
    accelerator: Accelerator
    compute: Compute
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module  # PolicyAndCritic as `accelerate` prepared it (DDP, DeepSpeed)
    unwrapped: PolicyAndCritic
    reference: PreTrainedModel | None  # None with an adapter: the policy with its adapter off
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl: KLController
    progress: TrainingProgress
    sources: list[RewardSource]
    judge: Judge | None
    ptx: Iterator | None
    prompts: tuple[list[str], list[list[int]], list[str], list[list[int]]]  # train, train ids, eval, eval ids
    staging: Path
    log: MetricsLog
    local_rollout: int  # episodes of each update on this process
    local_mini: int
    keep_from: tuple[int, int] | None  # policy's and critic's lowest trained block, when learning starts there

    @property
    def rank_rows(self) -> slice:
        """This process's share of each update's episodes."""
        index = self.accelerator.process_index
        return slice(index * self.local_rollout, (index + 1) * self.local_rollout)

    def across_processes(self, sums: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(sums, reduction="sum")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PPOStageConfig, "ppo", argv)
    inputs = stage_inputs(config)
    print_ = fingerprint(config, inputs)
    if skip_unchanged("ppo", config, print_):
        return

    state = start_processes()
    output = StagedOutput(config.output_dir, "ppo")
    run = prepare(config, state, output, print_)
    eval_initial = None
    if run.progress.update == 0 and config.eval_every:
        eval_initial = held_out(run)
        run.log.log(0, eval_initial)
    first_update, started, metrics = run.progress.update, time.time(), {}
    bar = tqdm(range(first_update, config.num_updates), initial=first_update, total=config.num_updates,
               desc="ppo", unit="update", disable=not run.accelerator.is_main_process)
    for update in bar:
        metrics = ppo_update(run, update, print_)
        bar.set_postfix(reward=f"{metrics['reward/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
    seconds = time.time() - started  # the training loop, with its periodic evaluations
    episodes = (config.num_updates - first_update) * config.rollout_batch_size
    finish(run, output, inputs, print_, metrics, eval_initial, seconds, episodes)


def ppo_update(run: PPORun, update: int, print_: str) -> dict:
    """One PPO update: rollout, rewards, advantages, learning; then its metrics, evaluation and checkpoint."""
    config, times = run.config, [clock(run.compute)]
    first, prompts, prompt_ids = episode_batch(run, update)
    # 1. Rollout: a sampled reply per prompt; the policy's and the reference's log-probs, the critic's values.
    with whole_weights(run.accelerator, run.model):
        rollout = sample_replies(run.unwrapped.policy, run.tokenizer, prompt_ids, config, run.compute,
                                 seed=config.seed * 1_000_003 + first + run.rank_rows.start)
        times.append(clock(run.compute))
        score_rollout(run.unwrapped, run.reference, rollout, config, run.compute, run.keep_from)
        times.append(clock(run.compute))
    # 2. Rewards: the sources' score on each reply's last token, the KL penalty on every token.
    scores, per_source, _ = score_replies(run.sources, run.tokenizer, prompts, prompt_ids, rollout, config)
    times.append(clock(run.compute))
    mask = rollout.reply_mask
    token_kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * mask
    rewards = token_rewards(scores, token_kl, mask, run.kl.coef)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, total=run.across_processes)
    # 3. Advantages: GAE, whitened over the whole batch (all processes).
    advantages, returns = generalized_advantages(rewards, rollout.values, mask, config.gamma, config.lam)
    advantages = masked_whiten(advantages, mask, total=run.across_processes)
    times.append(clock(run.compute))
    # 4. Learn.
    stats = learn(run, rollout, advantages, returns, update)
    times.append(clock(run.compute))
    # 5. Log, evaluate, checkpoint.
    metrics = update_metrics(run, rollout, scores, per_source, token_kl, stats)
    run.kl.update(metrics["objective/kl"], config.rollout_batch_size)
    # Where the update's time went (the periodic held-out evaluation below is not counted).
    spans = [later - earlier for earlier, later in pairwise(times)]
    phases = dict(zip(("sample", "score", "reward", "advantages", "learn"), spans, strict=True))
    metrics.update({"kl_coef": run.kl.coef, "lr": run.scheduler.get_last_lr()[0],
                    "episodes": first + config.rollout_batch_size,
                    **{f"time/{phase}": seconds for phase, seconds in phases.items()},
                    "time/update": times[-1] - times[0],
                    "episodes_per_second": config.rollout_batch_size / (times[-1] - times[0]),
                    **peak_memory(run.compute)})
    run.progress.update = done = update + 1
    if config.eval_every and (done % config.eval_every == 0 or done == config.num_updates):
        metrics.update(held_out(run))
    run.log.log(done, metrics)
    # Checked before saving, so the newest checkpoint is always a good one.
    if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
        raise PipelineError(f"ppo: non-finite metrics at update {done} (loss or reward diverged); lower "
                            "learning_rate or check the reward sources; checkpoints (if any) in "
                            f"{run.staging / RESUME} hold only earlier updates")
    if config.save_every and done % config.save_every == 0 and done < config.num_updates:
        save_checkpoint(run.accelerator, run.staging, done, print_)
    return metrics


def peak_memory(compute: Compute) -> dict[str, float]:
    """The accelerator's high-water mark of allocated memory so far, in GiB (what fits is the question a GPU
    user asks); nothing on the CPU, whose resident memory the operating system reports."""
    if compute.device.type != "cuda":
        return {}
    return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(compute.device) / 2 ** 30}


def clock(compute: Compute) -> float:
    """The time once the device has done its queued work: a GPU runs asynchronously, and without waiting a
    phase's time would be counted in whichever later phase first needs a result."""
    if compute.device.type == "cuda":
        torch.cuda.synchronize(compute.device)
    return time.time()


def episode_batch(run: PPORun, update: int) -> tuple[int, list[str], list[list[int]]]:
    """The first global episode of the update, and this process's prompts (text and token ids). Episode e of
    the run is prompt order[e % n] of epoch e // n, each epoch a fresh shuffle: the batch of any update follows
    from its number, so a resumed run sees the same prompts."""
    config, (train_prompts, train_ids, _, _) = run.config, run.prompts
    first = update * config.rollout_batch_size
    orders: dict[int, torch.Tensor] = {}  # one shuffle per epoch the batch touches (at most two)
    batch_index = []
    for episode in range(first, first + config.rollout_batch_size):
        epoch, position = divmod(episode, len(train_prompts))
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(train_prompts),
                                           generator=torch.Generator().manual_seed(config.seed + epoch))
        batch_index.append(int(orders[epoch][position]))
    batch_index = batch_index[run.rank_rows]
    return first, [train_prompts[i] for i in batch_index], [train_ids[i] for i in batch_index]


def learn(run: PPORun, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
          update: int) -> dict[str, list[float]]:
    """`ppo_epochs` passes over the batch, each in a fresh order; one optimizer step per minibatch, its
    gradient accumulated over micro-batches. Returns every step's statistics."""
    config, stats = run.config, {}
    for _ in range(config.ppo_epochs):
        permutation = torch.randperm(run.local_rollout)
        for mini_start in range(0, run.local_rollout, run.local_mini):
            for micro_start in range(mini_start, mini_start + run.local_mini, config.micro_batch_size):
                rows = permutation[micro_start:micro_start + config.micro_batch_size]
                with run.accelerator.accumulate(run.model):
                    step_stats = learning_step(run, rollout, rows, advantages, returns, update)
                for key, value in step_stats.items():
                    stats.setdefault(key, []).append(value)
    return stats


def learning_step(run: PPORun, rollout: Rollout, rows: torch.Tensor, advantages: torch.Tensor,
                  returns: torch.Tensor, update: int) -> dict[str, float]:
    """Losses of one micro-batch and their backward pass; the optimizer steps when the minibatch is complete."""
    config, accelerator = run.config, run.accelerator
    ids, attention, positions, width = rollout.micro(rows)
    ptx_ids = ptx_mask = ptx_labels = None
    if run.ptx is not None:
        ptx_ids, ptx_mask, ptx_labels = (t.to(run.compute.device) for t in next(run.ptx))
    with run.compute.autocast():  # the rollout's numerics: the ratio starts at exactly 1
        logits, values, ptx_logits = run.model(ids, attention, positions, width, ptx_ids, ptx_mask,
                                               rollout.micro_starts(rows))
    logprobs = token_logprobs(logits, ids[:, -width:], config.temperature)
    policy_loss, value_loss, stats = ppo_losses(
        logprobs, rollout.logprobs[rows, :width], advantages[rows, :width], values, rollout.values[rows, :width],
        returns[rows, :width], rollout.reply_mask[rows, :width], config.cliprange, config.cliprange_value)
    loss = policy_loss + config.vf_coef * value_loss
    if ptx_logits is not None:
        ptx_loss = torch.nn.functional.cross_entropy(ptx_logits[:, :-1].flatten(0, 1).float(),
                                                     ptx_labels[:, 1:].flatten())
        loss = loss + config.ptx_coef * ptx_loss
        stats["loss/ptx"] = ptx_loss.item()
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        norm = accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
        # A NaN step would be written into the weights (and a checkpoint) before any metric showed it. fp16's
        # loss scaler skips overflowing steps itself; DeepSpeed clips inside its own step and reports no norm.
        if norm is not None and accelerator.scaler is None and not math.isfinite(norm):  # a tensor, or a float
            raise PipelineError(f"ppo: non-finite gradient norm at update {update + 1} ({float(norm)}); the step "
                                "was not taken; lower learning_rate or check the reward sources; checkpoints (if "
                                f"any) in {run.staging / RESUME} hold only earlier updates")
    run.optimizer.step()
    if accelerator.sync_gradients:
        for network in (run.unwrapped.policy, run.unwrapped.critic):  # AdaLoRA moves rank by this step's gradients
            allocate_adapter_rank(network, run.scheduler.last_epoch)
    run.optimizer.zero_grad()
    if accelerator.sync_gradients:
        run.scheduler.step()
    return {**stats, "loss/policy": policy_loss.item(), "loss/value": value_loss.item()}


def update_metrics(run: PPORun, rollout: Rollout, scores: torch.Tensor, per_source: dict[str, list[float]],
                   token_kl: torch.Tensor, stats: dict[str, list[float]]) -> dict:
    """This update's metrics, averaged over processes."""
    mask, coef = rollout.reply_mask, run.kl.coef
    local = {
        "reward/score": scores.mean().item(),
        **{f"reward/{name}": statistics.fmean(values) for name, values in per_source.items()},
        "objective/kl": token_kl.sum(dim=1).mean().item(),
        "objective/non_score_reward": (-coef * token_kl).sum(dim=1).mean().item(),
        "objective/rlhf_reward": (scores - coef * token_kl.sum(dim=1)).mean().item(),
        "reply/length": mask.sum(dim=1).mean().item(),
        "reply/eos_rate": rollout.finished.float().mean().item(),
        "value/mean": masked_mean(rollout.values, mask).item(),
        "policy/entropy": masked_mean(rollout.entropy, mask).item(),
        **{key: statistics.fmean(values) for key, values in stats.items()},
    }
    values = torch.tensor(list(local.values()), device=run.compute.device)
    return dict(zip(local, run.accelerator.reduce(values, reduction="mean").tolist(), strict=True))


def held_out(run: PPORun) -> dict:
    with whole_weights(run.accelerator, run.model):
        _, _, eval_prompts, eval_ids = run.prompts
        return evaluate(run.unwrapped, run.reference, run.tokenizer, run.sources, run.judge, eval_prompts, eval_ids,
                        run.config, run.compute)


# ----------------------------------------------------------------------------------------------------------
# Before the first update and after the last


def make_accelerator(config: PPOStageConfig, state: PartialState) -> tuple[Accelerator, Compute, int, int]:
    """The accelerator, this process's device and precision, and its share of a rollout and of a minibatch."""
    processes = state.num_processes
    local_rollout, local_mini = config.rollout_batch_size // processes, config.mini_batch_size // processes
    if (config.rollout_batch_size % config.mini_batch_size or config.mini_batch_size % processes
            or local_mini % config.micro_batch_size):
        raise PipelineError(f"rollout_batch_size ({config.rollout_batch_size}) must be a multiple of mini_batch_size "
                            f"({config.mini_batch_size}), which must be a multiple of processes ({processes}) x "
                            f"micro_batch_size ({config.micro_batch_size})")
    accumulation = local_mini // config.micro_batch_size
    precision = choose_precision(config.precision, state.device)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                              gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation))
    if accelerator.state.deepspeed_plugin is not None:
        # DeepSpeed learns batch sizes from a dataloader or a trainer's "auto" values; this loop has neither.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            {"train_micro_batch_size_per_gpu": config.micro_batch_size, "gradient_accumulation_steps": accumulation,
             "gradient_clipping": config.max_grad_norm})
        # Models load whole (accelerate asked transformers to build them as ZeRO-3 shards): prepare() shards
        # the two trained ones; the frozen reference and reward models stay whole, outside any engine.
        unset_hf_deepspeed_config()
    return accelerator, Compute(accelerator.device, precision), local_rollout, local_mini


def prepare(config: PPOStageConfig, state: PartialState, output: StagedOutput, print_: str) -> PPORun:
    """Validate every input before any work or output, build the models and the optimizer, open the output
    folder (resuming an interrupted run with the same inputs)."""
    accelerator, compute, local_rollout, local_mini = make_accelerator(config, state)
    validate(config)
    require_checkpoint(config.policy, "policy", "run `make sft` or pass --policy <checkpoint>")
    require_checkpoint(config.reward_model, "reward model", "run `make rm` or pass REWARD_MODEL=<folder>")
    if config.reference:
        require_checkpoint(config.reference, "reference", "pass --reference <the SFT checkpoint> or leave it empty")
    if prompt_learning_adapter(config.policy):
        raise PipelineError(f"ppo: {config.policy} is a prefix/p_tuning/prompt adapter, which cannot be merged; PPO "
                            "starts from whole weights: run SFT with peft_method none, lora, adalora or ia3")
    tokenizer = load_tokenizer(config.policy)
    for other in (config.critic, config.reference):
        if other:
            check_tokenizers_match(config.policy, tokenizer, other)
    prompts = load_prompt_split(config, tokenizer)
    if len(prompts[0]) < config.rollout_batch_size:
        raise PipelineError(f"{config.prompts}: {len(prompts[0])} training prompts, fewer than one rollout batch "
                            f"({config.rollout_batch_size}); add prompts or lower rollout_batch_size")
    sources = load_reward_sources(config, config.policy, tokenizer, compute)
    judge = load_judge(config.judge, compute) if config.judge else None
    ptx = ptx_batches(config, tokenizer, config.seed + accelerator.process_index) if config.ptx_coef else None
    if ptx is not None:
        next(ptx)  # reads and checks the SFT data now, not at the first update

    set_seed(config.seed)
    policy, critic, reference = build_models(config, tokenizer, compute.dtype)
    resume_from = resume_point(output.staging, print_) if output.staging.is_dir() else None
    need = output_bytes([policy, critic], resumable=bool(config.save_every))  # briefly two resume checkpoints
    staging = open_output(output, state, keep=resume_from is not None, need_bytes=need)
    if reference is not None:
        reference.to(compute.device)
    # Two learning rates, one optimizer: the critic starts from the RM and can often move faster.
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in policy.parameters() if p.requires_grad]},
         {"params": [p for p in critic.parameters() if p.requires_grad],
          "lr": config.critic_learning_rate or config.learning_rate}],
        lr=config.learning_rate, eps=config.adam_eps, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=config.optimizer_steps())
    model, optimizer = accelerator.prepare(PolicyAndCritic(policy, critic), optimizer)
    kl = KLController(config.kl_coef, config.target_kl, config.kl_horizon)
    progress = TrainingProgress(kl)
    accelerator.register_for_checkpointing(scheduler, progress)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"ppo: resuming from {resume_from} (update {progress.update} of {config.num_updates})")
    keep_from = learning_start(config, accelerator, policy, critic, compute)
    accelerator.print(f"ppo: {len(prompts[0])} training / {len(prompts[2])} eval prompts, {config.num_updates} "
                      f"updates of {config.rollout_batch_size} episodes, {state.num_processes} process(es); "
                      f"{config.policy} -> {config.output_dir}")
    return PPORun(config, accelerator, compute, tokenizer, model, accelerator.unwrap_model(model), reference,
                  optimizer, scheduler, kl, progress, sources, judge, ptx, prompts, staging,
                  MetricsLog(staging, accelerator.is_main_process, progress.update), local_rollout, local_mini,
                  keep_from)


def learning_start(config: PPOStageConfig, accelerator: Accelerator, policy: PreTrainedModel,
                   critic: PreTrainedModel, compute: Compute) -> tuple[int, int] | None:
    """The blocks learning starts from (`ppo/top_blocks.py`): the lowest trained one of policy and critic, when
    both train their top blocks only and run exactly from a kept input of it. Not under DeepSpeed, whose engine
    gathers and releases each block's weights around its own forward."""
    if (not config.trainable_layers or config.uses_adapter() or config.critic_peft_method != "none"
            or accelerator.state.deepspeed_plugin is not None):
        return None
    blocks = (lowest_trained_block(policy), lowest_trained_block(critic))
    if not all(blocks):
        return None  # every block trains: nothing to skip
    if all(resumes_exactly(network, block, compute) for network, block in zip((policy, critic), blocks, strict=True)):
        accelerator.print(f"ppo: learning runs the policy from block {blocks[0]} and the critic from block "
                          f"{blocks[1]}, on their inputs kept in scoring")
        return blocks
    accelerator.print("ppo: this architecture does not hand inputs_embeds to its first block unchanged: learning "
                      "runs the frozen blocks too")
    return None


def finish(run: PPORun, output: StagedOutput, inputs: dict, print_: str, metrics: dict, eval_initial: dict | None,
           seconds: float, episodes: int) -> None:
    """Save the policy and critic, write the manifest and swap the folder into place; print the headline."""
    config = run.config
    save_final(run.accelerator, run.model, run.tokenizer, config, run.staging)
    if run.accelerator.is_main_process:
        final_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        initial = {k: v for k, v in (eval_initial or {}).items() if k.startswith("eval/")}
        summary = {
            **{k.replace("eval/", "final_"): v for k, v in final_eval.items()},
            **{k.replace("eval/", "initial_"): v for k, v in initial.items()},
            "updates": run.progress.update,
            "episodes": run.progress.update * config.rollout_batch_size,
            "train_seconds": seconds,
            "episodes_per_second": episodes / seconds if seconds else 0.0,
            "kl_coef": run.kl.coef,
            "samples": metrics.get("samples", []),
            **peak_memory(run.compute),
        }
        # The critic's folder carries its own small manifest: what it started from and whose critic it is.
        (run.staging / "value" / "pipeline.json").write_text(json.dumps(
            {"stage": "ppo-critic", "policy_manifest": "../pipeline.json",
             "inputs": {"critic": describe_parent(config.critic or config.reward_model)}}, indent=2) + "\n")
        final = output.commit(config, inputs, summary, print_)
        line = f"ppo: {run.progress.update} updates, {summary['episodes_per_second']:.2f} episodes/s"
        for key, label in (("eval/reward", "held-out reward"), ("eval/judge_score", "judge"), ("eval/kl", "KL"),
                           ("eval/length", "length")):
            if key in final_eval:
                line += f"; {label} " + (f"{initial[key]:.3f} -> " if key in initial else "") + f"{final_eval[key]:.3f}"
        print(f"{line}; wrote {final}")
