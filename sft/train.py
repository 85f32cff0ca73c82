"""Stage 1: supervised fine-tuning with trl's SFTTrainer, loss on the assistant's tokens only.

Usage:
    python -m sft --config configs/default.yaml                               # embedded default
    python -m sft --config configs/default.yaml --data my_chats.jsonl --output_dir runs/mine/sft
    python -m sft --config configs/default.yaml --peft_method lora --merge false  # keep a LoRA adapter
    python -m sft --config configs/default.yaml --peft_method prefix     # or adalora, ia3, p_tuning, prompt
    make sft SFT_DATA=my_chats.jsonl BASE_MODEL=path/or/hub-id                 # a pretrained model gets ChatML
    make sft NUM_PROCESSES=2                                                   # DDP, 2 processes
    make sft ACCELERATE_CONFIG=configs/accelerate/zero3.yaml NUM_PROCESSES=8   # DeepSpeed ZeRO-3

Reads any SFT data shape `data.chat` accepts, holds out an eval split (or takes `eval_data`), measures
the base model's eval loss, trains, measures again, and writes `output_dir` per the checkpoint
contract: a plain transformers checkpoint (a LoRA/AdaLoRA/IA3 adapter is merged unless `merge: false`; a
prefix/p_tuning/prompt adapter is kept on its base), with the chat template every later stage uses, metrics in
TensorBoard and `metrics.jsonl`, and `pipeline.json`. A rerun with unchanged inputs does nothing; a rerun
after a kill resumes from the last trainer checkpoint (every `save_steps` steps).
"""

import math
import os

import torch
from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from common.adapters import AdaLoraBudget, peft_config, planned_steps, start_prefix_from_tokens
from common.chat_template import choose_chat_template
from common.checkpoint import StagedOutput, fingerprint, skip_unchanged
from common.config import parse_config, parse_mapping
from common.distributed import start_processes
from common.metrics import JsonlMetricsCallback
from common.modeling import generate_replies, load_causal_lm, load_tokenizer
from common.precision import Compute
from common.training import StopOnNonFinite, frozen_in_compute_dtype, open_for_training, save_trained_model
from data.chat import load_chat_examples, split_train_eval
from sft.config import SFTStageConfig, stage_inputs


def load_splits(config: SFTStageConfig) -> tuple[list, list]:
    columns = parse_mapping(config.columns, "columns")
    examples = load_chat_examples(config.data, columns)
    if config.eval_data:
        train, evaluation = examples, load_chat_examples(config.eval_data, columns)
    else:
        train, evaluation = split_train_eval(examples, config.eval_fraction, config.seed)
    if config.max_train_examples:
        train = train[: config.max_train_examples]
    if config.max_eval_examples:
        evaluation = evaluation[: config.max_eval_examples]
    return train, evaluation


def main(argv: list[str] | None = None) -> None:
    config = parse_config(SFTStageConfig, "sft", argv)
    state = start_processes()
    inputs = stage_inputs(config)
    print_ = fingerprint(config, inputs)
    if skip_unchanged("sft", config, print_):
        return

    # Validate everything before any work or any output.
    compute = Compute.choose(config.precision)
    train, evaluation = load_splits(config)
    tokenizer = load_tokenizer(config.model, chat=False)
    set_seed(config.seed)
    model = load_causal_lm(config.model)
    chat = choose_chat_template(tokenizer, model, config.chat_template, config.model)
    steps = planned_steps(len(train), config.per_device_train_batch_size, state.num_processes,
                          config.gradient_accumulation_steps, config.num_train_epochs, config.max_steps)
    adapter = peft_config(config, model, "CAUSAL_LM", "sft", refused={}, total_steps=steps,
                          new_tokens=tokenizer.convert_tokens_to_ids(chat.added_tokens))
    output = StagedOutput(config.output_dir, "sft")
    staging, resume = open_for_training(output, state, print_, model, config)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(staging / "tensorboard")

    trainer = SFTTrainer(
        model=model,
        # Loss on the assistant's replies (and their end-of-turn token) only: the model learns to
        # answer, not to imitate the user. Needs `{% generation %}` markers in the chat template.
        # The base model's eval loss is measured inside train() (step 0), where DDP and DeepSpeed have
        # prepared the model: evaluate() before train() stops DDP from wrapping it (each process then
        # trains its own copy) and DeepSpeed ZeRO-2 refuses it. A resumed run already has that number.
        args=SFTConfig(assistant_only_loss=True, max_length=config.max_length, dataset_num_proc=None,
                       eval_on_start=resume is None, **config.trainer_kwargs(staging, compute)),
        train_dataset=Dataset.from_dict({"messages": train}),
        eval_dataset=Dataset.from_dict({"messages": evaluation}),
        processing_class=tokenizer,
        peft_config=adapter,
        callbacks=[JsonlMetricsCallback(staging / "metrics.jsonl"), StopOnNonFinite("sft"), AdaLoraBudget()],
    )
    frozen_in_compute_dtype(trainer, compute, "sft")
    if config.peft_method == "p_tuning":
        start_prefix_from_tokens(trainer.model, torch.randint(len(tokenizer), (config.num_virtual_tokens,)))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    state.print(f"sft: chat template {chat.template}; EOS {chat.eos_token}, pad {chat.pad_token}"
                + (f"; added {', '.join(chat.added_tokens)} (embeddings grown to {len(tokenizer)})"
                   if chat.added_tokens else ""))
    state.print(f"sft: {len(train)} train / {len(evaluation)} eval examples, {state.num_processes} process(es), "
                f"{config.peft_method} ({trainable:,} trainable parameters), {config.model} -> {config.output_dir}"
                + (f"; resuming from {resume}" if resume else ""))
    result = trainer.train(resume_from_checkpoint=resume)
    base_eval_loss = next(row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row)
    final_eval = trainer.evaluate()
    trained = save_trained_model(trainer, staging, config, config.model, load_causal_lm)
    if trained is None:
        return  # not the main process: it has done its share of training and evaluation

    prompts = [example[0]["content"] if example[0]["role"] != "system" else example[1]["content"]
               for example in evaluation[: config.num_sample_prompts]]
    with compute.autocast():
        replies, _ = generate_replies(trained, tokenizer, prompts, config.max_new_tokens, what="sft")
    metrics = {
        "base_eval_loss": base_eval_loss,
        "base_eval_perplexity": math.exp(base_eval_loss),
        "eval_loss": final_eval["eval_loss"],
        "eval_perplexity": math.exp(final_eval["eval_loss"]),
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "train_seconds": result.metrics["train_runtime"],
        "processes": state.num_processes,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "peft_method": config.peft_method,
        "trainable_parameters": trainable,
        "adapter": config.keeps_adapter(),
        "chat_template": chat.template,
        "added_tokens": chat.added_tokens,
        "samples": [{"prompt": p, "reply": r} for p, r in zip(prompts, replies, strict=True)],
    }
    final = output.commit(config, inputs, metrics, print_)
    print(f"sft: eval loss {metrics['base_eval_loss']:.3f} -> {metrics['eval_loss']:.3f} "
          f"(perplexity {metrics['base_eval_perplexity']:.1f} -> {metrics['eval_perplexity']:.1f}), "
          f"{result.global_step} steps; wrote {final}")
    for sample in metrics["samples"]:
        print(f"  user: {sample['prompt']!r}\n  assistant: {sample['reply']!r}")
