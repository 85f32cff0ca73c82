"""Stage 3 without a critic: RLOO (Ahmadian et al. 2024, "Back to Basics") with trl's RLOOTrainer, from the SFT
model on the PPO prompts, against the same rewards as PPO.

Usage:
    python -m rloo --config configs/default.yaml                          # against runs/default/rm
    python -m rloo --config configs/default.yaml --num_generations 8 --output_dir runs/default/rloo8
    python -m rloo --config configs/default.yaml --extra_rewards "mypkg.rules:polite=0.5"
    make rloo                  # after make rm; PROMPTS=my_prompts.jsonl for your own
    make methods               # PPO, DPO and RLOO from one SFT model and one set of preferences, then eval

Each prompt gets `num_generations` replies. A reply's reward is PPO's score (the reward model's whitened score,
weighted extra sources, clipped, minus the missing-EOS penalty) minus kl_coef times its log-ratio to the SFT
reference summed over its tokens: the KL-penalised objective of PPO. Its advantage is that reward minus the mean
reward of the prompt's other replies, an unbiased baseline that replaces PPO's critic (no value model, no GAE).
Why RLOO rather than GRPO: GRPO divides advantages by the group's reward std and puts the KL in the loss, so
its objective and its beta are not PPO's; RLOO's are, which makes the comparison in the report about the
estimator alone. Writes `output_dir` per the checkpoint contract; a rerun with unchanged inputs does nothing, a
rerun after a kill resumes from the last trainer checkpoint.
"""

import os
import statistics
from collections.abc import Callable

from datasets import Dataset
from transformers import PreTrainedTokenizerBase, set_seed
from trl import RLOOConfig, RLOOTrainer

from common.adapters import AdaLoraBudget, peft_config, planned_steps
from common.checkpoint import StagedOutput, fingerprint, skip_unchanged
from common.config import parse_config
from common.distributed import start_processes
from common.metrics import JsonlMetricsCallback
from common.modeling import freeze_lower_blocks, load_causal_lm, load_tokenizer
from common.options import POLICY_REFUSED
from common.precision import Compute
from common.reward import prompt_input_ids
from common.training import StopOnNonFinite, frozen_in_compute_dtype, open_for_training, save_trained_model
from ppo.inputs import tokenized_prompts
from ppo.models import disable_dropout
from ppo.rewards import RewardSource, combine_scores, load_reward_sources
from rloo.config import RLOOStageConfig, stage_inputs, validate


def reward_function(sources: list[RewardSource], tokenizer: PreTrainedTokenizerBase,
                    config: RLOOStageConfig) -> Callable[..., list[float]]:
    """trl's reward-function interface around PPO's scoring. The reward model reads the prompt's ids and the
    sampled ids (with EOS where the reply ended), exactly what the policy wrote; each source's mean is logged."""
    def pipeline_reward(prompts, completions, completion_ids, log_metric, **_) -> list[float]:
        prompt_ids = [prompt_input_ids(tokenizer, prompt) for prompt in prompts]
        texts = [completion[-1]["content"] for completion in completions]
        finished = [bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in completion_ids]
        user_turns = [prompt[-1]["content"] for prompt in prompts]
        total, per_source = combine_scores(sources, user_turns, prompt_ids, completion_ids, texts, finished, config)
        for name, scores in per_source.items():
            log_metric(f"score/{name}", statistics.fmean(scores))
        return total.tolist()

    return pipeline_reward


def main(argv: list[str] | None = None) -> None:
    config = parse_config(RLOOStageConfig, "rloo", argv)
    validate(config)
    state = start_processes()
    inputs = stage_inputs(config)
    print_ = fingerprint(config, inputs)
    if skip_unchanged("rloo", config, print_):
        return

    # Validate everything before any work or any output.
    compute = Compute.choose(config.precision)
    tokenizer = load_tokenizer(config.policy)
    prompts, _ = tokenized_prompts(config.prompts, config.prompt_column, tokenizer, config.max_prompt_length)
    sources = load_reward_sources(config, config.policy, tokenizer, compute)
    set_seed(config.seed)
    model = load_causal_lm(config.policy)
    disable_dropout(model)
    # trl samples once per optimizer step's worth of micro-batches and reuses that batch num_iterations times.
    replies_per_step = (config.per_device_train_batch_size * state.num_processes * config.gradient_accumulation_steps
                        // config.num_iterations)
    prompts_per_step = max(1, replies_per_step // config.num_generations)
    steps = planned_steps(len(prompts), prompts_per_step, 1, 1, config.num_train_epochs, config.max_steps)
    adapter = peft_config(config, model, "CAUSAL_LM", "rloo", refused=POLICY_REFUSED, total_steps=steps)
    if config.trainable_layers:
        trainable = freeze_lower_blocks(model, config.trainable_layers)
        state.print(f"rloo: training the top {config.trainable_layers} blocks: {trainable:,} parameters")
    output = StagedOutput(config.output_dir, "rloo")
    staging, resume = open_for_training(output, state, print_, model, config)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(staging / "tensorboard")
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward_function(sources, tokenizer, config),
        args=RLOOConfig(num_generations=config.num_generations, max_completion_length=config.max_new_tokens,
                        temperature=config.temperature, beta=config.kl_coef, num_iterations=config.num_iterations,
                        epsilon=config.cliprange, disable_dropout=True, **config.trainer_kwargs(staging, compute)),
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]}),
        processing_class=tokenizer,
        peft_config=adapter,
        callbacks=[JsonlMetricsCallback(staging / "metrics.jsonl"), StopOnNonFinite("rloo"), AdaLoraBudget()],
    )
    frozen_in_compute_dtype(trainer, compute, "rloo")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    state.print(f"rloo: {len(prompts)} prompts x {config.num_generations} replies, {steps} steps of "
                f"{prompts_per_step} prompts, {state.num_processes} process(es), {config.peft_method} ({trainable:,} "
                f"trainable parameters), {config.policy} -> {config.output_dir}"
                + (f"; resuming from {resume}" if resume else ""))
    result = trainer.train(resume_from_checkpoint=resume)
    trained = save_trained_model(trainer, staging, config, config.policy, load_causal_lm)
    if trained is None:
        return  # not the main process: it has done its share of training

    logged = [row for row in trainer.state.log_history if "reward" in row]
    first, last = logged[0], logged[-1]
    metrics = {
        **{f"{when}_{key}": row.get(name) for when, row in (("initial", first), ("final", last))
           for key, name in (("reward", "reward"), ("score_rm", "score/rm"), ("kl", "kl"),
                             ("length", "completions/mean_length"))},
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "episodes": result.global_step * replies_per_step,
        "train_seconds": result.metrics["train_runtime"],
        "processes": state.num_processes,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "peft_method": config.peft_method,
        "trainable_parameters": trainable,
    }
    final = output.commit(config, inputs, metrics, print_)
    print(f"rloo: {metrics['steps']} steps, {metrics['episodes']} episodes; reward {first['reward']:.3f} -> "
          f"{last['reward']:.3f}, per-token KL {first.get('kl', 0):.3f} -> {last.get('kl', 0):.3f}, length "
          f"{first['completions/mean_length']:.1f} -> {last['completions/mean_length']:.1f}; wrote {final}")
