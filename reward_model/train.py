"""Stage 2: a pairwise (Bradley-Terry) reward model with trl's RewardTrainer, initialised from the SFT model.

Usage:
    python -m reward_model --config configs/default.yaml                         # on the collected prefs
    python -m reward_model --config configs/default.yaml --data my_prefs.jsonl --output_dir runs/mine/rm
    python -m reward_model --config configs/default.yaml --peft_method lora      # or adalora, ia3 (merged)
    python -m reward_model --config configs/default.yaml --model runs/default/rm \
        --data runs/default/prefs/ranked.jsonl,runs/default/round2/prefs/ranked.jsonl   # a round: warm start
    make rm                    # make prefs first, then this
    make rm PREFS=my_prefs.jsonl
    make rm ACCELERATE_CONFIG=configs/accelerate/zero2.yaml NUM_PROCESSES=2   # DeepSpeed ZeRO-2

Reads any preference shape `data.preferences` accepts (pairs, chat, HH transcripts, rankings/scores),
holds out pairs by prompt (no prompt is in both splits), trains a one-logit sequence classifier whose
score is read at the last real token, and reports held-out pairwise accuracy, mean chosen/rejected
score and margin, plus the reward mean/std over its training responses (PPO normalises with them).
Writes `output_dir` per the checkpoint contract; a rerun with unchanged inputs does nothing, a rerun after
a kill resumes from the last trainer checkpoint.
"""

import os
import random
import statistics

import torch
from transformers import set_seed
from trl import RewardConfig

from common.adapters import AdaLoraBudget, peft_config, planned_steps
from common.checkpoint import StagedOutput, fingerprint, skip_unchanged
from common.config import parse_config, parse_mapping
from common.distributed import start_processes
from common.metrics import JsonlMetricsCallback
from common.modeling import freeze_lower_blocks, load_reward_model, load_tokenizer
from common.options import PROMPT_LEARNING
from common.precision import Compute
from common.reward import RewardScorer
from common.training import StopOnNonFinite, frozen_in_compute_dtype, open_for_training, save_trained_model
from data.preferences import PreferencePair, check_prompt_lengths, prompt_key, split_preferences
from reward_model.config import RewardStageConfig, stage_inputs
from reward_model.grouped import GroupCollator, GroupedRewardTrainer, tokenize_groups

# Why a reward model cannot be a prompt-learning adapter.
PROMPT_LEARNING_REFUSED = dict.fromkeys(
    PROMPT_LEARNING, "its adapter cannot be merged, and every reader of a reward model (PPO's reward and critic, "
    "prefs, eval, score) takes a plain sequence classifier")


def score_pairs(scorer: RewardScorer, pairs: list[PreferencePair], what: str) -> tuple[list[float], list[float]]:
    """Scores of each pair's chosen and rejected reply."""
    prompts = [p.prompt for p in pairs]
    chosen = scorer.score(prompts, [p.chosen for p in pairs], [p.chosen_finished for p in pairs],
                          progress=f"{what} chosen")
    rejected = scorer.score(prompts, [p.rejected for p in pairs], [p.rejected_finished for p in pairs],
                            progress=f"{what} rejected")
    return chosen, rejected


def pairwise_metrics(chosen: list[float], rejected: list[float], prefix: str) -> dict[str, float]:
    # A tie counts half: a constant model scores 0.5, not 0 or 1.
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    return {f"{prefix}_accuracy": wins / len(chosen), f"{prefix}_chosen_mean": statistics.fmean(chosen),
            f"{prefix}_rejected_mean": statistics.fmean(rejected),
            f"{prefix}_margin": statistics.fmean(c - r for c, r in zip(chosen, rejected, strict=True))}


def reward_normalisation(scorer: RewardScorer, train: list[PreferencePair], config: RewardStageConfig) -> dict:
    """Mean and std of the reward over distinct training replies: PPO can whiten its rewards with them."""
    replies = {(prompt_key(p), reply): (p.prompt, reply, done) for p in train
               for reply, done in ((p.chosen, p.chosen_finished), (p.rejected, p.rejected_finished))}
    sample = list(replies.values())
    random.Random(config.seed).shuffle(sample)
    sample = sample[: config.norm_responses]
    scores = scorer.score([s[0] for s in sample], [s[1] for s in sample], [s[2] for s in sample],
                          progress="rm: scoring training replies")
    return {"reward_mean": statistics.fmean(scores), "reward_std": statistics.pstdev(scores),
            "reward_stat_replies": len(scores)}


def main(argv: list[str] | None = None) -> None:
    config = parse_config(RewardStageConfig, "rm", argv)
    state = start_processes()
    inputs = stage_inputs(config)
    print_ = fingerprint(config, inputs)
    if skip_unchanged("rm", config, print_):
        return

    # Validate everything before any work or any output.
    config.check_one_way_to_train_fewer(config.trainable_layers)
    compute = Compute.choose(config.precision)
    train, evaluation_by_file = split_preferences(config, parse_mapping(config.columns, "columns"), config.seed)
    evaluation = [pair for held in evaluation_by_file.values() for pair in held]
    tokenizer = load_tokenizer(config.model)
    check_prompt_lengths(train + evaluation, tokenizer, config.max_length - 1)
    train_dataset = tokenize_groups(train, tokenizer, config.max_length, "train")
    eval_dataset = tokenize_groups(evaluation, tokenizer, config.max_length, "eval")
    set_seed(config.seed)  # the new score head is initialised from this seed
    model = load_reward_model(config.model, tokenizer.pad_token_id)
    steps = planned_steps(len(train_dataset), config.per_device_train_batch_size, state.num_processes,
                          config.gradient_accumulation_steps, config.num_train_epochs, config.max_steps)
    adapter = peft_config(config, model, "SEQ_CLS", "rm", refused=PROMPT_LEARNING_REFUSED, total_steps=steps)
    if config.trainable_layers:
        trainable = freeze_lower_blocks(model, config.trainable_layers)
        state.print(f"rm: training the top {config.trainable_layers} blocks and the head: {trainable:,} parameters")
    output = StagedOutput(config.output_dir, "rm")
    staging, resume = open_for_training(output, state, print_, model, config)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(staging / "tensorboard")
    trainer = GroupedRewardTrainer(
        model=model,
        use_margin=config.use_margin,
        data_collator=GroupCollator(tokenizer.pad_token_id),
        # Dropout off: the same score for the same input in training and when PPO reads it.
        args=RewardConfig(disable_dropout=True, max_length=config.max_length,
                          center_rewards_coefficient=config.center_rewards_coefficient or None,
                          **config.trainer_kwargs(staging, compute)),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=adapter,  # SEQ_CLS keeps the new score head fully trainable
        callbacks=[JsonlMetricsCallback(staging / "metrics.jsonl"), StopOnNonFinite("rm"), AdaLoraBudget()],
    )
    frozen_in_compute_dtype(trainer, compute, "rm")
    if config.head_learning_rate:
        # The score head starts from random weights next to a trained backbone: at the backbone's small
        # learning rate it barely moves in a short run, so it gets its own, larger one.
        groups = {"head": [], "body": []}
        for name, parameter in trainer.model.named_parameters():
            if parameter.requires_grad:
                groups["head" if ".score." in f".{name}." or name.startswith("score") else "body"].append(parameter)
        trainer.optimizer = torch.optim.AdamW(
            [{"params": groups["body"]}, {"params": groups["head"], "lr": config.head_learning_rate}],
            lr=config.learning_rate, weight_decay=config.weight_decay)
    train_pairs = sum(len(row) for row in train_dataset["better"])
    state.print(f"rm: {train_pairs} train pairs over {len(train_dataset)} prompts / {len(evaluation)} held-out "
                f"pairs, {state.num_processes} process(es), {config.model} -> {config.output_dir}"
                + (f"; resuming from {resume}" if resume else ""))
    result = trainer.train(resume_from_checkpoint=resume)
    trained = save_trained_model(trainer, staging, config, config.model,
                                 lambda path: load_reward_model(path, tokenizer.pad_token_id))
    if trained is None:
        return  # not the main process: it has done its share of training

    scorer = RewardScorer(trained, tokenizer, compute, batch_size=config.per_device_eval_batch_size)
    chosen, rejected = score_pairs(scorer, evaluation, "rm: scoring eval")
    metrics = {
        **pairwise_metrics(chosen, rejected, "eval"),
        **reward_normalisation(scorer, train, config),
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_pairs": train_pairs,
        "train_prompts": len(train_dataset),
        "eval_pairs": len(evaluation),
        "train_seconds": result.metrics["train_runtime"],
        "processes": state.num_processes,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "peft_method": config.peft_method,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "adapter": config.keeps_adapter(),
    }
    if len(evaluation_by_file) > 1:  # iterated rounds: is the newest round's data learnt, the oldest kept?
        by_file, start = {}, 0  # `evaluation` lists each file's held-out pairs in turn
        for source, held in evaluation_by_file.items():
            end = start + len(held)
            by_file[source] = pairwise_metrics(chosen[start:end], rejected[start:end], "eval")["eval_accuracy"]
            start = end
        metrics["eval_accuracy_by_file"] = by_file
    trainer.log({key: value for key, value in metrics.items() if isinstance(value, float)})
    final = output.commit(config, inputs, metrics, print_)
    print(f"rm: held-out pairwise accuracy {metrics['eval_accuracy']:.3f} on {len(evaluation)} pairs "
          f"(chosen {metrics['eval_chosen_mean']:.3f}, rejected {metrics['eval_rejected_mean']:.3f}, "
          f"margin {metrics['eval_margin']:.3f}); reward mean {metrics['reward_mean']:.3f} "
          f"std {metrics['reward_std']:.3f}; {result.global_step} steps; wrote {final}")
