"""Stage 3 without a reward model: DPO (Rafailov et al. 2023) with trl's DPOTrainer, from the SFT model on the
reward model's preference pairs.

Usage:
    python -m dpo --config configs/default.yaml                              # on the collected prefs
    python -m dpo --config configs/default.yaml --data my_prefs.jsonl --output_dir runs/mine/dpo
    python -m dpo --config configs/default.yaml --loss_type ipo --beta 0.5   # or hinge, robust, sigmoid,sft, ...
    python -m dpo --config configs/default.yaml --peft_method lora          # merged into the saved policy
    make dpo                   # after make prefs; PREFS=my_prefs.jsonl for your own
    make methods               # PPO, DPO and RLOO from one SFT model and one set of preferences, then eval

Reads every preference shape the reward-model stage reads (rankings expanded to all their pairs) and holds
out the same prompts it holds out (same eval_fraction and seed), so the held-out accuracy of DPO's implicit
reward, beta * log(policy / reference) summed over a reply, sits next to the reward model's. The policy
learns to prefer chosen over rejected relative to the frozen SFT reference; no reward model and no sampling.
Writes `output_dir` per the checkpoint contract (a plain causal LM with the SFT chat template, metrics in
TensorBoard and `metrics.jsonl`, `pipeline.json`); a rerun with unchanged inputs does nothing, a rerun after a
kill resumes from the last trainer checkpoint.
"""

import os

from datasets import Dataset
from transformers import PreTrainedTokenizerBase, set_seed
from trl import DPOConfig, DPOTrainer

from common.adapters import AdaLoraBudget, peft_config, planned_steps
from common.checkpoint import StagedOutput, fingerprint, skip_unchanged
from common.config import parse_config, parse_mapping
from common.distributed import start_processes
from common.metrics import JsonlMetricsCallback
from common.modeling import freeze_lower_blocks, generate_replies, load_causal_lm, load_tokenizer
from common.options import POLICY_REFUSED
from common.precision import Compute
from common.reward import prompt_input_ids, reply_input_ids
from common.training import StopOnNonFinite, frozen_in_compute_dtype, open_for_training, save_trained_model
from data.preferences import PreferencePair, check_prompt_lengths, split_preferences
from dpo.config import DPOStageConfig, stage_inputs, validate


def tokenized_pairs(pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Each pair as the reward model reads it: the prompt through the chat template up to the assistant's turn,
    then each reply's tokens with EOS only where the reply ended. trl would render the replies through the chat
    template, which ends every reply with end-of-turn, also one cut off at the length limit; DPO would then
    teach the policy to stop where the sampler had merely run out of tokens."""
    return Dataset.from_dict({
        "prompt_ids": [prompt_input_ids(tokenizer, pair.prompt) for pair in pairs],
        "chosen_ids": [reply_input_ids(tokenizer, pair.chosen, pair.chosen_finished) for pair in pairs],
        "rejected_ids": [reply_input_ids(tokenizer, pair.rejected, pair.rejected_finished) for pair in pairs],
    })


class TokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on pairs `tokenized_pairs` already tokenized."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def main(argv: list[str] | None = None) -> None:
    config = parse_config(DPOStageConfig, "dpo", argv)
    validate(config)
    state = start_processes()
    inputs = stage_inputs(config)
    print_ = fingerprint(config, inputs)
    if skip_unchanged("dpo", config, print_):
        return

    # Validate everything before any work or any output.
    compute = Compute.choose(config.precision)
    train, evaluation_by_file = split_preferences(config, parse_mapping(config.columns, "columns"), config.seed)
    evaluation = [pair for held in evaluation_by_file.values() for pair in held]
    tokenizer = load_tokenizer(config.model)
    check_prompt_lengths(train + evaluation, tokenizer, config.max_length - 1)
    set_seed(config.seed)
    model = load_causal_lm(config.model)
    # With an adapter the reference is the policy with its adapter off: one copy of the weights.
    reference = None if config.uses_adapter() else load_causal_lm(config.model)
    steps = planned_steps(len(train), config.per_device_train_batch_size, state.num_processes,
                          config.gradient_accumulation_steps, config.num_train_epochs, config.max_steps)
    adapter = peft_config(config, model, "CAUSAL_LM", "dpo", refused=POLICY_REFUSED, total_steps=steps)
    if config.trainable_layers:
        trainable = freeze_lower_blocks(model, config.trainable_layers)
        state.print(f"dpo: training the top {config.trainable_layers} blocks: {trainable:,} parameters")
    output = StagedOutput(config.output_dir, "dpo")
    staging, resume = open_for_training(output, state, print_, model, config)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(staging / "tensorboard")
    trainer = TokenizedDPOTrainer(
        model=model,
        ref_model=reference,
        # Dropout off: the reference and the policy must give the same log-probs for the same weights.
        args=DPOConfig(loss_type=config.losses(), loss_weights=config.weights(), beta=config.beta,
                       label_smoothing=config.label_smoothing, max_length=config.max_length, disable_dropout=True,
                       **config.trainer_kwargs(staging, compute)),
        train_dataset=tokenized_pairs(train, tokenizer),
        eval_dataset=tokenized_pairs(evaluation, tokenizer),
        processing_class=tokenizer,
        peft_config=adapter,
        callbacks=[JsonlMetricsCallback(staging / "metrics.jsonl"), StopOnNonFinite("dpo"), AdaLoraBudget()],
    )
    frozen_in_compute_dtype(trainer, compute, "dpo")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    state.print(f"dpo: {len(train)} train / {len(evaluation)} held-out pairs, loss {config.loss_type}, beta "
                f"{config.beta}, {state.num_processes} process(es), {config.peft_method} ({trainable:,} trainable "
                f"parameters), {config.model} -> {config.output_dir}" + (f"; resuming from {resume}" if resume else ""))
    result = trainer.train(resume_from_checkpoint=resume)
    final_eval = trainer.evaluate()
    trained = save_trained_model(trainer, staging, config, config.model, load_causal_lm)
    if trained is None:
        return  # not the main process: it has done its share of training and evaluation

    prompts = list(dict.fromkeys(pair.prompt[-1]["content"] for pair in evaluation))[:3]
    with compute.autocast():
        replies, _ = generate_replies(trained, tokenizer, prompts, 32, what="dpo")
    metrics = {
        # The implicit reward's held-out pairwise accuracy (batch means averaged, as trl logs it) and margin.
        "eval_accuracy": final_eval["eval_rewards/accuracies"],
        "eval_margin": final_eval["eval_rewards/margins"],
        "eval_loss": final_eval["eval_loss"],
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_pairs": len(train),
        "eval_pairs": len(evaluation),
        "train_seconds": result.metrics["train_runtime"],
        "processes": state.num_processes,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "peft_method": config.peft_method,
        "trainable_parameters": trainable,
        "samples": [{"prompt": p, "reply": r} for p, r in zip(prompts, replies, strict=True)],
    }
    final = output.commit(config, inputs, metrics, print_)
    print(f"dpo: held-out implicit-reward accuracy {metrics['eval_accuracy']:.3f} on {len(evaluation)} pairs "
          f"(margin {metrics['eval_margin']:.3f}), loss {result.training_loss:.3f}; {result.global_step} steps; "
          f"wrote {final}")
    for sample in metrics["samples"]:
        print(f"  user: {sample['prompt']!r}\n  assistant: {sample['reply']!r}")
