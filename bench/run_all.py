"""All of the project's benchmarks in one command: SFT and reward-model training throughput against plain trl
scripts, PPO against trl 1.12, peak memory of each, and achieved FLOP/s of training against this CPU's
measured matmul peak. Prints one markdown table of ratios and writes bench/results.json.

Usage:
    python bench/run_all.py                      # everything, 3 repeats (about 12 min on 2 cores)
    python bench/run_all.py --quick              # 1 repeat, fewer steps, no SmolLM2 run: a smoke test
    python bench/run_all.py --repeats 5 --smollm2_steps 0
    make bench ARGS="--quick"

What is measured (each run its own process, ours and the other side alternating, medians of repeats):
- SFT and RM tokens/s: bench/train_vs_trl.py (`python -m sft` / `python -m reward_model` against
  bench/plain_trl.py) on the tiny model of configs/tiny.yaml, and SFT once more on the embedded SmolLM2-135M
  for a few steps (`--smollm2_steps`, about 40 s a run): the tiny model's matmuls are 64 wide and its time
  goes to the softmax over 49k tokens and per-step overheads, so only a real model shows real utilisation;
- PPO episodes/s, full fine-tune and LoRA: bench/ppo_vs_trl.py against trl 1.12 (its own venv), on the tiny
  model and, where a GPU is present, on SmolLM2-135M at GPU sizes (with peak GPU memory and utilisation);
- sampling tokens/s of SmolLM2-135M, our eager and compiled backends against transformers' `generate`
  (bench/sampling.py, in its own process; not with --quick);
- peak resident memory of every run (wait4 ru_maxrss of the process);
- FLOP/s utilisation: 6 N tokens/s (bench/flops.py says what N is) over the median fp32 matmul FLOP/s of this
  CPU at torch's default threads.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable

import ppo_vs_trl
import torch
from flops import matmul_peak
from harness import DEFAULT, ROOT, TINY, WORK, machine_facts, run
from train_vs_trl import TrainingBench, benchmark

SMOLLM2 = WORK / "smollm2_base"
LABELS = {"sft_tiny": "SFT, tiny", "rm_tiny": "RM, tiny", "sft_smollm2": "SFT, SmolLM2-135M"}


def training_benches(quick: bool, smollm2_steps: int) -> list[TrainingBench]:
    scale = 2 if quick else 1  # quick: half the steps
    benches = [
        TrainingBench("sft_tiny", "sft", str(TINY), str(WORK / "base"), max_length=160, batch_size=8,
                      steps=8 // scale, learning_rate=3e-3),
        # A tiny RM step takes tens of milliseconds: many of them, so that train() lasts seconds.
        TrainingBench("rm_tiny", "rm", str(TINY), str(WORK / "base"), max_length=160, batch_size=8,
                      steps=64 // scale, learning_rate=1e-3),
    ]
    if smollm2_steps:
        benches.append(TrainingBench("sft_smollm2", "sft", str(DEFAULT), str(SMOLLM2), max_length=160,
                                     batch_size=4, steps=smollm2_steps, learning_rate=5e-5))
    return benches


def row(label: str, ours: float, trl: float, text: Callable[[float], str]) -> dict:
    return {"row": label, "ours": ours, "trl": trl, "ratio": ours / trl, "ours_text": text(ours), "trl_text": text(trl)}


def training_rows(label: str, result: dict, peak_flops: float) -> list[dict]:
    ours, trl = result["median"]["ours"], result["median"]["trl"]

    def flops_text(share: float) -> str:
        return f"{share * peak_flops / 1e9:.2f} GFLOP/s = {share:.2%}"

    return [
        row(f"{label}: tokens/s", ours["tokens_per_second"], trl["tokens_per_second"], "{:.0f}".format),
        row(f"{label}: peak MiB", ours["peak_mib"], trl["peak_mib"], "{:.0f}".format),
        row(f"{label}: FLOP/s, share of matmul peak", ours["flops_per_second"] / peak_flops,
            trl["flops_per_second"] / peak_flops, flops_text),
    ]


def ppo_rows(results: dict, model: str) -> list[dict]:
    rows = []
    for mode, label in (("full", f"PPO full fine-tune, {model}"), ("lora", f"PPO LoRA r16, {model}")):
        ours, trl = results["modes"][mode]["median"]["ours"], results["modes"][mode]["median"]["trl"]
        rows += [row(f"{label}: episodes/s", ours["episodes_per_second"], trl["episodes_per_second"], "{:.2f}".format),
                 row(f"{label}: peak MiB", ours["peak_mib"], trl["peak_mib"], "{:.0f}".format)]
        if "peak_gpu_gib" in ours:
            rows.append(row(f"{label}: peak GPU GiB", ours["peak_gpu_gib"], trl["peak_gpu_gib"], "{:.1f}".format))
        if "gpu_utilisation" in ours and "gpu_utilisation" in trl:
            rows.append(row(f"{label}: mean GPU utilisation", ours["gpu_utilisation"], trl["gpu_utilisation"],
                            "{:.0f}%".format))
    return rows


def sampling_rows(results: dict) -> list[dict]:
    return [row(f"Sampling {size}, SmolLM2-135M, {backend} vs generate: tokens/s", result[backend]["tokens_per_second"],
                result["generate"]["tokens_per_second"], "{:.0f}".format)
            for size, result in results["results"].items() for backend in ("eager", "compiled")]


def print_table(rows: list[dict], peak: dict, machine: dict) -> None:
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads); fp32 matmul peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s; "
          f"load average before the benchmark {machine['load_average_at_start'][0]:.1f} (near 0 on an idle "
          "machine; higher: other work shared the CPU and the timings are noisier)")
    print("\n| benchmark | ours | other side | ours / other |\n| --- | --- | --- | --- |")
    for entry in rows:
        print(f"| {entry['row']} | {entry['ours_text']} | {entry['trl_text']} | {entry['ratio']:.2f}x |")
    print(f"\nother side: a plain trl {machine['trl']} script (SFT, RM), trl 1.12's PPOTrainer (PPO), transformers' "
          "`generate` (sampling). Ratios above 1 "
          "favour ours in speed and FLOP/s rows, below 1 in memory rows.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs per side (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, half the steps, no SmolLM2 run")
    parser.add_argument("--smollm2_steps", type=int, default=None, help="SFT steps on SmolLM2-135M (default 6, "
                                                                          "quick 0; 0 skips it)")
    parser.add_argument("--ppo_updates", type=int, default=None, help="PPO updates per run (default 4, quick 2)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    options = parser.parse_args()
    repeats = options.repeats or (1 if options.quick else 3)
    smollm2_steps = options.smollm2_steps if options.smollm2_steps is not None else (0 if options.quick else 6)
    ppo_updates = options.ppo_updates or (2 if options.quick else 4)

    machine = {**machine_facts(), "load_average_at_start": os.getloadavg()}
    before = matmul_peak()
    print(f"bench: fp32 matmul peak {before['peak_flops'] / 1e9:.0f} GFLOP/s ({before['threads']} threads)")
    ppo_vs_trl.prepare_models()  # the tiny base model and the chitchat data the SFT and RM benchmarks use too
    if smollm2_steps:
        run([sys.executable, "-m", "common.base_model", "--config", str(DEFAULT), "--output_dir", str(SMOLLM2)])

    training = {bench.name: benchmark(bench, repeats) for bench in training_benches(options.quick, smollm2_steps)}
    ppo = ppo_vs_trl.benchmark(repeats, ppo_updates)
    gpu = torch.cuda.is_available()
    ppo_smollm2 = ppo_vs_trl.benchmark(repeats, ppo_updates, "smollm2") if gpu else None
    sampling = None
    if not options.quick:
        sampling_json = WORK / "sampling.json"
        run([sys.executable, str(ROOT / "bench" / "sampling.py"), "--repeats", str(repeats),
             "--batches", "16,128" if gpu else "16,64", "--output", str(sampling_json)])
        sampling = json.loads(sampling_json.read_text())
    machine["load_average_at_end"] = os.getloadavg()
    # Measured before and after, the better one counts: other work on the machine during one of them would
    # otherwise understate the peak and overstate every utilisation.
    after = matmul_peak()
    peak = {**max(before, after, key=lambda measured: measured["peak_flops"]),
            "peak_flops_before_and_after": [before["peak_flops"], after["peak_flops"]]}

    rows = [entry for name, result in training.items()
            for entry in training_rows(LABELS[name], result, peak["peak_flops"])] + ppo_rows(ppo, "tiny")
    if ppo_smollm2:
        rows += ppo_rows(ppo_smollm2, "SmolLM2-135M")
    if sampling:
        rows += sampling_rows(sampling)
    print_table(rows, peak, machine)
    results = {
        "settings": {"repeats": repeats, "quick": options.quick, "smollm2_steps": smollm2_steps,
                     "ppo_updates": ppo_updates},
        "machine": machine, "matmul_peak": peak, "training": training, "ppo": ppo, "ppo_smollm2": ppo_smollm2,
        "sampling": sampling,
        "table": rows,
    }
    with open(options.output, "w") as handle:
        handle.write(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {options.output}")


if __name__ == "__main__":
    main()
