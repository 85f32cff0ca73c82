"""The options the stages' config dataclasses share (adapters, trainer, precision), free of torch and the
training libraries: a stage parses its config and finds its output up to date in about a second, before it
imports what training needs (10 s or more on a CPU, paid each time `make` passes an unchanged stage)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checkpoint import RESUME, describe_input
from common.errors import PipelineError

if TYPE_CHECKING:
    from common.precision import Compute

PEFT_METHODS = ("none", "lora", "adalora", "ia3", "prefix", "p_tuning", "prompt")
PROMPT_LEARNING = ("prefix", "p_tuning", "prompt")
# Why a policy that DPO or RLOO trains cannot be a prompt-learning adapter.
POLICY_REFUSED = dict.fromkeys(PROMPT_LEARNING, "the policy must be one that PPO, DPO, RLOO and iterated rounds can "
                               "continue from, and they take plain weights (or a mergeable adapter)")


@dataclass
class AdapterOptions:
    peft_method: str = field(default="none", metadata={
        "help": "none (train the weights themselves), lora, adalora, ia3 (merged into the saved model unless merge "
                "is off), prefix (prefix tuning), p_tuning (P-tuning v2: a prefix in every layer, no MLP), prompt "
                "(prompt tuning; these three are saved as an adapter on the base model)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (AdaLoRA: the initial rank, halved on average)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA/AdaLoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA/AdaLoRA dropout (PPO: always 0)"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "modules LoRA/AdaLoRA adapt: all-linear or comma-separated names (IA3 takes peft's per-family "
                "choice)"})
    num_virtual_tokens: int = field(default=16, metadata={"help": "prefix, p_tuning, prompt: virtual tokens"})
    merge: bool = field(default=True, metadata={"help": "merge a LoRA/AdaLoRA/IA3 adapter into the saved model"})

    def uses_adapter(self) -> bool:
        return self.peft_method != "none"

    def keeps_adapter(self) -> bool:
        """Whether the saved checkpoint is an adapter on the base model rather than whole weights."""
        return self.peft_method in PROMPT_LEARNING or (self.uses_adapter() and not self.merge)

    def check_one_way_to_train_fewer(self, trainable_layers: int, critic_peft_method: str = "none") -> None:
        """An adapter and `trainable_layers` both shrink what trains; together their meaning is unclear."""
        if trainable_layers and (self.uses_adapter() or critic_peft_method != "none"):
            raise PipelineError("peft_method and trainable_layers are two ways to train fewer weights; choose one")


def check_peft_method(method: str, stage: str, refused: dict[str, str]) -> None:
    if method not in PEFT_METHODS:
        raise PipelineError(f"{stage}: peft_method must be one of {', '.join(PEFT_METHODS)}, got {method!r}")
    if method in refused:
        supported = ", ".join(m for m in PEFT_METHODS if m not in refused)
        raise PipelineError(f"{stage}: peft_method {method} is not supported here: {refused[method]}; use one of "
                            f"{supported}")


def precision_option() -> Any:
    """The `precision` option of every stage's config dataclass, with one default and one help text."""
    return field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16 (auto: bf16 on a GPU that has it, "
                                                   "fp32 on the CPU)"})


GENERATION_BACKENDS = ("eager", "compiled")


def generation_backend_option() -> Any:
    """The `generation_backend` option of the stages that sample (common/sampling.py has the two backends)."""
    return field(default="eager", metadata={
        "help": "eager (a KV cache grown a token at a time) or compiled (a static KV cache and a torch.compile'd "
                "decode step, CUDA graphs on a GPU: a compile of up to a minute first, then faster tokens)"})


def check_generation_backend(backend: str) -> None:
    if backend not in GENERATION_BACKENDS:
        raise PipelineError(f"generation_backend must be one of {', '.join(GENERATION_BACKENDS)}, got {backend!r}")


@dataclass
class PreferenceDataOptions:
    """The preference data of the stages that learn from comparisons (the reward model, DPO): the same files,
    pairs and held-out prompts for both, so their held-out accuracies compare."""

    data: str = field(default="runs/default/prefs/ranked.jsonl", metadata={"help": "preference data: a file, or "
                                                                                      "several comma-separated"})
    eval_data: str = field(default="", metadata={"help": "held-out pairs; empty: hold out eval_fraction of prompts"})
    columns: str = field(default="", metadata={"help": "column mapping, e.g. chosen=good,rejected=bad"})
    min_margin: float = field(default=0.0, metadata={"help": "drop scored pairs whose scores differ by no more"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of prompts held out when no eval_data"})
    max_train_pairs: int = field(default=0, metadata={"help": "train on at most this many pairs (0: all)"})
    max_eval_pairs: int = field(default=500, metadata={"help": "evaluate on at most this many pairs (0: all)"})

    def data_inputs(self) -> dict[str, Any]:
        """What the output depends on in the data: each file's contents."""
        return {key: [describe_input(source) for source in data_files(text)] if "," in text else describe_input(text)
                for key, text in (("data", self.data), ("eval_data", self.eval_data)) if text}


def data_files(text: str) -> list[str]:
    """A data option's files: one path, or several comma-separated (iterated rounds train on every round's)."""
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass
class RewardOptions:
    """How the online stages (PPO, RLOO) score a sampled reply: the same sources, weights and shaping for both."""

    reward_model: str = field(default="runs/default/rm", metadata={"help": "reward model checkpoint"})
    reward_model_weight: float = field(default=1.0, metadata={"help": "weight of the reward model's score"})
    extra_rewards: str = field(default="", metadata={"help": "more reward sources, 'spec=weight,...': a spec is an "
                                                              "RM folder or module:function; each is logged"})
    normalize_reward: bool = field(default=True, metadata={"help": "whiten RM scores with the mean/std the RM "
                                                                   "stage stored in its pipeline.json"})
    reward_clip: float = field(default=5.0, metadata={"help": "clip the summed score to [-c, c]; 0: off"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the score of a reply cut "
                                                                      "off at max_new_tokens (no EOS)"})


@dataclass
class TrainerOptions(AdapterOptions):
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (max_steps wins when > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: from num_train_epochs"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "examples per device per step"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "examples per device in eval"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps with linear warm-up"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    logging_steps: int = field(default=10, metadata={"help": "log train metrics every N steps"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: at the start/end only)"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint the training state every N steps; a rerun "
                                                          "after a kill resumes from the last one; 0: never"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward "
                                                                          "pass: less memory, a third more compute"})
    precision: str = precision_option()
    seed: int = field(default=42, metadata={"help": "seed for data order, split and initialisation"})
    force: bool = field(default=False, metadata={"help": "retrain even if the output is up to date"})

    def trainer_kwargs(self, staging: Path, compute: "Compute") -> dict[str, Any]:
        """`compute` is this process's device and resolved precision: fp32 weights, autocast in bf16/fp16."""
        return dict(
            output_dir=str(staging / RESUME),
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            warmup_steps=self.warmup_ratio,  # a float below 1 is a fraction of the total steps
            lr_scheduler_type=self.lr_scheduler_type,
            weight_decay=self.weight_decay,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            # trl turns this on by default; on a CPU or a model that fits, it only costs time.
            gradient_checkpointing=self.gradient_checkpointing,
            eval_strategy="steps" if self.eval_steps else "no",
            eval_steps=self.eval_steps or None,
            save_strategy="steps" if self.save_steps else "no",
            save_steps=self.save_steps or None,
            save_total_limit=2,  # the newest may be half-written when the run is killed; the one before is whole
            # transformers would drop NaN/inf losses from the logged mean; the divergence check must see them.
            logging_nan_inf_filter=False,
            bf16=compute.precision == "bf16",
            fp16=compute.precision == "fp16",
            use_cpu=compute.device.type == "cpu",  # without it the trainer refuses bf16 autocast on a CPU
            seed=self.seed,
            data_seed=self.seed,
            report_to=["tensorboard"],
            dataloader_num_workers=0,
            # The process group `start_processes` joined: the trainer would otherwise reset and rebuild it,
            # losing the gloo backend DeepSpeed needs on a CPU.
            accelerator_config={"use_configured_state": True},
        )
