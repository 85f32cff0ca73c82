"""Side-by-side PPO benchmark: our `ppo` against trl 1.12's `trl.experimental.ppo.PPOTrainer`.

Usage:
    python bench/ppo_vs_trl.py                       # full fine-tune and LoRA, 3 repeats each
    python bench/ppo_vs_trl.py --repeats 1 --updates 2
    python bench/ppo_vs_trl.py --model smollm2       # the embedded SmolLM2-135M (on a GPU: the GPU sizes)
    make bench                                       # this and the other benchmarks: bench/run_all.py

Both do the same work: the model (the tiny one of configs/tiny.yaml, or SmolLM2-135M: its base as policy and
reference, the same weights with a one-logit head as reward model and critic), the same prompts,
rollout/minibatch/micro-batch sizes, reply length, PPO epochs, temperature, learning rate and KL coefficient;
periodic evaluation and checkpoints off on both sides, gradient checkpointing off on both, every weight trained.
On the CPU both run in fp32 at 16-episode updates. On a GPU both run in bf16 at the sizes of the issue that
measured our PPO there (256 episodes of 64 tokens an update, generation batch 128, mini-batch 64, micro-batch
32), and each run also reports its peak allocated GPU memory (ours from its manifest, trl's from its worker) and
the mean GPU utilisation over the process (nvidia-smi every 100 ms; loading included on both sides).
Every run is its own process; runs alternate between the two so drift in machine speed hits both. trl 1.12
lives in a throwaway venv this script creates (bench/.venv-trl112, with our torch, transformers, accelerate,
peft and datasets versions; offline, it needs their wheels where pip finds them). Prints episodes per second and
peak resident memory (medians of repeats) as ratios, and writes bench/results_ppo.json.
"""

import argparse
import json
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from harness import DEFAULT, ROOT, TINY, WORK, GpuMonitor, medians, peak_rss_of, run

TRL_VENV = ROOT / "bench" / ".venv-trl112"
# Each model's base folder (made by common.base_model from that config) and its reward model's.
MODELS = {"tiny": (TINY, WORK / "base", WORK / "rm"),
          "smollm2": (DEFAULT, WORK / "smollm2_base", WORK / "smollm2_rm")}
CPU_SIZES = {"rollout_batch_size": 16, "mini_batch_size": 16, "micro_batch_size": 4, "generation_batch_size": 16,
             "max_new_tokens": 24, "precision": "fp32"}
GPU_SIZES = {"rollout_batch_size": 256, "mini_batch_size": 64, "micro_batch_size": 32, "generation_batch_size": 128,
             "max_new_tokens": 64, "precision": "bf16"}


def prepare_models(model: str = "tiny") -> None:
    """The base model, a reward model with a fresh head on the same weights, and the tiny prompt sets."""
    config, base, reward_model = MODELS[model]
    run([sys.executable, "-m", "common.base_model", "--config", str(config), "--output_dir", str(base)])
    run([sys.executable, "-m", "data.chitchat", "--config", str(TINY), "--output_dir", str(WORK / "data")])
    if not (reward_model / "config.json").exists():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

        set_seed(0)
        head = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        head.save_pretrained(reward_model)
        AutoTokenizer.from_pretrained(base).save_pretrained(reward_model)


def prepare_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if not (TRL_VENV / ".ready").exists():
        print(f"bench: creating {TRL_VENV} with trl 1.12 (once)")
        run([sys.executable, "-m", "venv", str(TRL_VENV)])
        pins = [f"{name}=={metadata.version(name)}" for name in ("transformers", "accelerate", "peft", "datasets")]
        run([str(python), "-m", "pip", "install", "--quiet", f"torch=={metadata.version('torch').split('+')[0]}"])
        run([str(python), "-m", "pip", "install", "--quiet", "trl==1.12.0", *pins])
        (TRL_VENV / ".ready").touch()
    return python


def ours(settings: dict, lora: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "ppo", "--config", str(TINY), "--policy", settings["policy"],
                   "--reward_model", settings["reward_model"], "--prompts", settings["prompts"],
                   "--output_dir", f"{folder}/ppo", "--num_updates", str(settings["updates"]),
                   "--rollout_batch_size", str(settings["rollout_batch_size"]),
                   "--mini_batch_size", str(settings["mini_batch_size"]),
                   "--micro_batch_size", str(settings["micro_batch_size"]),
                   "--generation_batch_size", str(settings["generation_batch_size"]),
                   "--ppo_epochs", str(settings["ppo_epochs"]), "--max_new_tokens", str(settings["max_new_tokens"]),
                   "--temperature", str(settings["temperature"]), "--learning_rate", str(settings["learning_rate"]),
                   "--kl_coef", str(settings["kl_coef"]), "--missing_eos_penalty", str(settings["missing_eos_penalty"]),
                   "--reward_clip", "0", "--normalize_reward", "false", "--judge", "", "--eval_every", "0",
                   "--save_every", "0", "--num_eval_prompts", "1", "--seed", str(settings["seed"]),
                   "--peft_method", "lora" if lora else "none", "--trainable_layers", "0",
                   "--precision", settings["precision"], "--force", "true"]
        with GpuMonitor() as monitor:
            _, peak = peak_rss_of(command)
        metrics = json.loads((Path(folder) / "ppo" / "pipeline.json").read_text())["metrics"]
    return {"episodes_per_second": metrics["episodes"] / metrics["train_seconds"], "peak_mib": peak,
            **gpu_facts(metrics.get("memory/peak_allocated_gib"), monitor)}


def trl(python: Path, settings: dict, lora: bool) -> dict:
    worker = {**settings, "lora": lora, "episodes": settings["updates"] * settings["rollout_batch_size"]}
    with GpuMonitor() as monitor:
        stdout, peak = peak_rss_of([str(python), str(ROOT / "bench" / "trl_ppo_worker.py"), json.dumps(worker)])
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"episodes_per_second": result["episodes"] / result["seconds"], "peak_mib": peak,
            **gpu_facts(result.get("peak_gpu_gib"), monitor)}


def gpu_facts(peak_gib: float | None, monitor: GpuMonitor) -> dict:
    """A run's peak allocated GPU memory and mean GPU utilisation; nothing for a run on the CPU."""
    facts = {} if peak_gib is None else {"peak_gpu_gib": peak_gib}
    if monitor.mean_utilisation is not None:
        facts["gpu_utilisation"] = monitor.mean_utilisation
    return facts


def benchmark(repeats: int, updates: int, model: str = "tiny") -> dict:
    """Both modes (full fine-tune, LoRA), `repeats` alternating runs of each side: settings, runs, medians, ratios."""
    import torch

    prepare_models(model)
    python = prepare_trl_venv()
    _, base, reward_model = MODELS[model]
    sizes = GPU_SIZES if torch.cuda.is_available() else CPU_SIZES

    from transformers import AutoTokenizer

    from common.modeling import ensure_distinct_pad
    from common.reward import prompt_input_ids
    from data.prompts import load_prompts

    tokenizer = ensure_distinct_pad(AutoTokenizer.from_pretrained(base), "base")
    prompts = load_prompts(str(WORK / "data" / "prompts_ppo.jsonl"))[:257]
    prompt_file = WORK / "bench_prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    settings = {
        "model": model, "policy": str(base), "reward_model": str(reward_model), "prompts": str(prompt_file),
        # Our stage holds out its last prompt for evaluation (switched off here); trl gets the others.
        "prompt_ids": [prompt_input_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts[:-1]],
        "pad_token": tokenizer.pad_token, "updates": updates, **sizes, "ppo_epochs": 4,
        "temperature": 0.7, "learning_rate": 3e-6, "kl_coef": 0.05,
        "missing_eos_penalty": 1.0, "gradient_checkpointing": False, "seed": 0,
    }
    results = {"settings": {k: v for k, v in settings.items() if k != "prompt_ids"}, "modes": {}}
    print(f"bench: PPO, {repeats} repeats x {updates} updates x {settings['rollout_batch_size']} episodes, "
          f"{model} model, {settings['precision']}, ours against trl 1.12")
    for mode, lora in (("full", False), ("lora", True)):
        runs = {"ours": [], "trl": []}
        for repeat in range(repeats):
            runs["ours"].append(ours(settings, lora))
            runs["trl"].append(trl(python, settings, lora))
            print(f"  {mode} repeat {repeat + 1}: ours {runs['ours'][-1]}, trl 1.12 {runs['trl'][-1]}")
        keys = tuple(runs["ours"][0])  # the GPU's memory and utilisation too where a GPU ran them
        median = {side: medians(side_runs, keys) for side, side_runs in runs.items()}
        results["modes"][mode] = {
            "runs": runs, "median": median,
            "speed_ratio": median["ours"]["episodes_per_second"] / median["trl"]["episodes_per_second"],
            "memory_ratio": median["ours"]["peak_mib"] / median["trl"]["peak_mib"],
        }
    return results


def print_table(results: dict) -> None:
    gpu = "peak_gpu_gib" in results["modes"]["full"]["median"]["ours"]
    extra = " ours / trl 1.12 peak GPU GiB | ours / trl 1.12 GPU util |" if gpu else ""
    print(f"\n| mode | ours episodes/s | trl 1.12 episodes/s | speed ratio | ours peak MiB | trl 1.12 peak MiB | "
          f"memory ratio |{extra}\n|{' --- |' * (9 if gpu else 7)}")
    for mode, result in results["modes"].items():
        m = result["median"]
        line = (f"| {mode} | {m['ours']['episodes_per_second']:.2f} | {m['trl']['episodes_per_second']:.2f} | "
                f"{result['speed_ratio']:.2f}x | {m['ours']['peak_mib']:.0f} | {m['trl']['peak_mib']:.0f} | "
                f"{result['memory_ratio']:.2f}x |")
        if gpu:
            line += (f" {m['ours']['peak_gpu_gib']:.1f} / {m['trl']['peak_gpu_gib']:.1f} | "
                     f"{m['ours'].get('gpu_utilisation', float('nan')):.0f}% / "
                     f"{m['trl'].get('gpu_utilisation', float('nan')):.0f}% |")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--model", choices=tuple(MODELS), default="tiny")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results_ppo.json"))
    options = parser.parse_args()
    results = benchmark(options.repeats, options.updates, options.model)
    print_table(results)
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {options.output}")


if __name__ == "__main__":
    main()
