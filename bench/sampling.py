"""Sampling throughput: transformers' `generate` against our decoding loop (common/sampling.py), its eager and its
compiled backend, on the embedded SmolLM2-135M, in one process, the three alternating. Prints a table and writes
JSON.

Usage:
    python bench/sampling.py                                # the PPO default's batch (16 x 32 tokens) and 64 x 64
    python bench/sampling.py --batches 128 --new_tokens 64  # the issue's GPU sizes
    python bench/sampling.py --precision fp32 --repeats 5 --output bench/sampling.json

Every call samples at temperature 0.7 with EOS switched off, so each row runs to `new_tokens` and the three
do the same work: tokens/s = rows x new tokens / seconds of the call (synchronized on a GPU). The model is
loaded in the compute dtype under its autocast, as `make prefs` and `make eval` load theirs. Each backend is
called once first at each size and not timed: that call is the compile of the compiled backend (its seconds
are reported). On a GPU the mean utilisation (nvidia-smi, every 100 ms) and the peak allocated memory of each
backend's timed calls are reported too.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import DEFAULT, ROOT, WORK, GpuMonitor, machine_facts, run

from common.modeling import load_causal_lm, load_tokenizer
from common.precision import Compute
from common.sampling import sample

MODEL = WORK / "smollm2_base"
PROMPT = "Tell me about the last book you read and what you thought of it."
BACKENDS = ("generate", "eager", "compiled")


def sampler(model, tokenizer, backend: str, rows: int, new_tokens: int, compute: Compute) -> Callable[[], None]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    batch = tokenizer([text] * rows, return_tensors="pt", add_special_tokens=False).to(compute.device)

    def call() -> None:
        with torch.no_grad(), compute.autocast():
            if backend == "generate":
                model.generate(**batch, do_sample=True, temperature=0.7, top_k=None, top_p=None,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=tokenizer.pad_token_id)
            else:
                sample(model, batch["input_ids"], batch["attention_mask"], new_tokens, eos_token_id=-1,
                       pad_token_id=tokenizer.pad_token_id, temperature=0.7, backend=backend)
        if compute.device.type == "cuda":
            torch.cuda.synchronize()
    return call


def timed(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(model, tokenizer, rows: int, new_tokens: int, repeats: int, compute: Compute) -> dict:
    calls = {backend: sampler(model, tokenizer, backend, rows, new_tokens, compute) for backend in BACKENDS}
    first = {backend: timed(call) for backend, call in calls.items()}
    print(f"bench: {rows} x {new_tokens}: first calls (compiled: its compile) "
          + ", ".join(f"{backend} {seconds:.1f} s" for backend, seconds in first.items()), flush=True)
    seconds: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    utilisation: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    peak: dict[str, float] = {}
    for _ in range(repeats):
        for backend, call in calls.items():
            if compute.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with GpuMonitor() as monitor:
                seconds[backend].append(timed(call))
            if monitor.mean_utilisation is not None:
                utilisation[backend].append(monitor.mean_utilisation)
            if compute.device.type == "cuda":
                peak[backend] = torch.cuda.max_memory_allocated() / 2 ** 20
        print(f"bench: {rows} x {new_tokens}: " + ", ".join(f"{backend} {times[-1]:.2f} s"
                                                           for backend, times in seconds.items()), flush=True)
    result = {}
    for backend in BACKENDS:
        median = statistics.median(seconds[backend])
        result[backend] = {"seconds": seconds[backend], "median_seconds": median,
                           "tokens_per_second": rows * new_tokens / median, "first_call_seconds": first[backend],
                           "gpu_utilisation": statistics.fmean(utilisation[backend]) if utilisation[backend] else None,
                           "peak_mib": peak.get(backend)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,64", help="rows per call, comma-separated")
    parser.add_argument("--new_tokens", type=int, default=0, help="tokens per row; 0: 32 at 16 rows, else 64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--output", default=str(ROOT / "bench" / "sampling.json"))
    options = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        run([sys.executable, "-m", "common.base_model", "--config", str(DEFAULT), "--output_dir", str(MODEL)])
    compute = Compute.choose(options.precision)
    tokenizer = load_tokenizer(str(MODEL))
    model = load_causal_lm(str(MODEL), compute.dtype).to(compute.device).eval()
    sizes = [(int(rows), options.new_tokens or (32 if int(rows) == 16 else 64)) for rows in options.batches.split(",")]
    results = {f"{rows}x{tokens}": measure(model, tokenizer, rows, tokens, options.repeats, compute)
               for rows, tokens in sizes}

    device = torch.cuda.get_device_name() if compute.device.type == "cuda" else "CPU"
    print(f"\nsampling SmolLM2-135M on {device}, {compute.precision}, median of {options.repeats}\n")
    print("| rows x tokens | generate tok/s | eager tok/s | compiled tok/s | eager / generate | compiled / generate "
          "| compile s | GPU util generate / eager / compiled |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, result in results.items():
        speed = {backend: result[backend]["tokens_per_second"] for backend in BACKENDS}
        util = " / ".join("n/a" if result[b]["gpu_utilisation"] is None else f"{result[b]['gpu_utilisation']:.0f}%"
                          for b in BACKENDS)
        print(f"| {size} | {speed['generate']:.0f} | {speed['eager']:.0f} | {speed['compiled']:.0f} "
              f"| {speed['eager'] / speed['generate']:.2f}x | {speed['compiled'] / speed['generate']:.2f}x "
              f"| {result['compiled']['first_call_seconds']:.0f} | {util} |")
    output = {"machine": {**machine_facts(), "device": device}, "precision": compute.precision,
              "repeats": options.repeats, "results": results}
    Path(options.output).write_text(json.dumps(output, indent=2) + "\n")
    print(f"\nbench: wrote {options.output}")


if __name__ == "__main__":
    main()
