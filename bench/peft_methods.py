"""Every PEFT method on the embedded default: SFT's trainable parameters, time, peak memory, eval loss and
perplexity per method, and the reward model's held-out accuracy for the methods the RM takes. Prints a
markdown table (the README's) and writes bench/peft_methods.json; methods measured again replace their rows.

Usage:
    python bench/peft_methods.py                                   # about 70 min on 2 cores
    python bench/peft_methods.py --prefs runs/default/prefs/ranked.jsonl   # reuse preferences: 6 min less
    python bench/peft_methods.py --sft_methods lora,prompt --rm_methods ""
    make bench-peft ARGS="--rm_epochs 2"

Protocol: configs/default.yaml as `make sft` / `make rm` run it (SmolLM2-135M, 64 SFT steps of 4
conversations, 160 tokens), one run per method in its own process, one after the other. Only the method and
its learning rate change (LEARNING_RATES: adapters train few parameters from a zero or random start and need
larger steps than a full fine-tune; the values are the usual ones of each method's paper or peft's examples,
not tuned here). The reward models all start from the full fine-tune's SFT checkpoint and train on one
preference file: `--prefs`, or preferences sampled from that checkpoint as `make prefs` does; `--rm_epochs`
(default 1, half the default config's 2, to keep the run near an hour).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness import DEFAULT, WORK, machine_facts, peak_rss_of, run

OUT = WORK / "peft"
SFT_RATES = {"none": 5e-5, "lora": 5e-4, "adalora": 5e-4, "ia3": 5e-3, "prefix": 5e-4, "p_tuning": 1e-2,
             "prompt": 3e-2}
RM_RATES = {"none": 5e-5, "lora": 5e-4, "adalora": 5e-4, "ia3": 5e-3}


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "pipeline.json").read_text())["metrics"]


def stage(module: str, options: list[str]) -> tuple[dict, float | None, float | None]:
    """Run one stage as `make` does; its manifest metrics, wall seconds and peak resident MiB. A stage whose
    output is up to date (an earlier bench trained it) is not run again: its metrics are the earlier run's,
    and its wall time and memory are None (not measured now)."""
    output = Path(options[options.index("--output_dir") + 1])
    started = time.perf_counter()
    stdout, peak_mib = peak_rss_of([sys.executable, "-m", module, "--config", str(DEFAULT), *options])
    if "is up to date" in stdout:
        return metrics_of(output), None, None
    return metrics_of(output), time.perf_counter() - started, peak_mib


def sft(method: str) -> dict:
    options = ["--model", str(OUT / "base"), "--data", str(OUT / "data" / "sft_train.jsonl"),
               "--eval_data", str(OUT / "data" / "sft_eval.jsonl"), "--output_dir", str(OUT / f"sft_{method}"),
               "--peft_method", method, "--learning_rate", str(SFT_RATES[method])]
    metrics, wall, peak = stage("sft", options)
    return {"method": method, "learning_rate": SFT_RATES[method], "wall_seconds": wall, "peak_mib": peak,
            **{key: metrics[key] for key in ("trainable_parameters", "train_seconds", "base_eval_loss",
                                             "eval_loss", "base_eval_perplexity", "eval_perplexity", "adapter")}}


def reward_model(method: str, prefs: Path, epochs: int) -> dict:
    options = ["--model", str(OUT / "sft_none"), "--data", str(prefs), "--output_dir", str(OUT / f"rm_{method}"),
               "--peft_method", method, "--learning_rate", str(RM_RATES[method]), "--num_train_epochs", str(epochs)]
    metrics, wall, peak = stage("reward_model", options)
    return {"method": method, "learning_rate": RM_RATES[method], "wall_seconds": wall, "peak_mib": peak,
            **{key: metrics[key] for key in ("trainable_parameters", "train_seconds", "eval_accuracy",
                                             "eval_margin", "eval_pairs", "steps")}}


def methods(text: str, known: dict) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        sys.exit(f"bench: unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def merged(path: Path, results: dict) -> dict:
    """Rows of methods measured now replace their old rows in an earlier result file; the rest are kept, so
    one method can be measured again (say, at another learning rate) without the hour the others take."""
    if not path.is_file():
        return results
    old = json.loads(path.read_text())
    for table in ("sft", "reward_model"):
        fresh = {row["method"] for row in results[table]}
        order = [*SFT_RATES] if table == "sft" else [*RM_RATES]
        rows = [row for row in old.get(table, []) if row["method"] not in fresh] + results[table]
        results[table] = sorted(rows, key=lambda row: order.index(row["method"]))
    results["earlier_runs"] = [*old.get("earlier_runs", []), {"machine": old["machine"], "settings": old["settings"]}]
    return results


def print_tables(sft_rows: list[dict], rm_rows: list[dict]) -> None:
    full = next((row for row in sft_rows if row["method"] == "none"), None)
    print("\n| SFT method | learning rate | trainable parameters | train time | vs full | peak MiB "
          "| eval loss, step 0 -> end | perplexity |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in sft_rows:
        ratio = f"{row['train_seconds'] / full['train_seconds']:.2f}x" if full else "-"
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] else "earlier run"
        print(f"| {row['method']} | {row['learning_rate']:g} | {row['trainable_parameters']:,} "
              f"| {row['train_seconds']:.0f} s | {ratio} | {peak} "
              f"| {row['base_eval_loss']:.3f} -> {row['eval_loss']:.3f} | {row['eval_perplexity']:.1f} |")
    if rm_rows:
        print("\n| RM method | learning rate | trainable parameters | train time | held-out accuracy | margin |"
              "\n| --- | --- | --- | --- | --- | --- |")
        for row in rm_rows:
            print(f"| {row['method']} | {row['learning_rate']:g} | {row['trainable_parameters']:,} "
                  f"| {row['train_seconds']:.0f} s | {row['eval_accuracy']:.3f} ({row['eval_pairs']} pairs) "
                  f"| {row['eval_margin']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft_methods", default=",".join(SFT_RATES), help="comma-separated SFT methods")
    parser.add_argument("--rm_methods", default=",".join(RM_RATES), help="comma-separated RM methods ('' none)")
    parser.add_argument("--prefs", default="", help="ranked preferences for the RMs (default: sample them)")
    parser.add_argument("--rm_epochs", type=int, default=1, help="RM epochs (the default config trains 2)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("peft_methods.json")))
    options = parser.parse_args()
    sft_methods, rm_methods = methods(options.sft_methods, SFT_RATES), methods(options.rm_methods, RM_RATES)
    if rm_methods and "none" not in sft_methods and not (OUT / "sft_none" / "pipeline.json").is_file():
        sys.exit("bench: the reward models start from the full fine-tune's SFT: add none to --sft_methods")

    machine = {**machine_facts(), "load_average_at_start": os.getloadavg()}
    run([sys.executable, "-m", "common.base_model", "--config", str(DEFAULT), "--output_dir", str(OUT / "base")])
    run([sys.executable, "-m", "data.chitchat", "--config", str(DEFAULT), "--output_dir", str(OUT / "data")])
    sft_rows = []
    for method in sft_methods:
        sft_rows.append(sft(method))
        print(f"bench: sft {method}: eval loss {sft_rows[-1]['eval_loss']:.3f} in "
              f"{sft_rows[-1]['train_seconds']:.0f} s", flush=True)
    prefs = Path(options.prefs) if options.prefs else OUT / "prefs" / "ranked.jsonl"
    if rm_methods and not options.prefs:
        run([sys.executable, "-m", "data.collect", "--config", str(DEFAULT), "--policy", str(OUT / "sft_none"),
             "--prompts", str(OUT / "data" / "prompts_prefs.jsonl"), "--output_dir", str(prefs.parent)])
    rm_rows = []
    for method in rm_methods:
        rm_rows.append(reward_model(method, prefs, options.rm_epochs))
        print(f"bench: rm {method}: accuracy {rm_rows[-1]['eval_accuracy']:.3f} in "
              f"{rm_rows[-1]['train_seconds']:.0f} s", flush=True)
    machine["load_average_at_end"] = os.getloadavg()

    results = merged(Path(options.output), {"settings": {"prefs": str(prefs), "rm_epochs": options.rm_epochs},
                                            "machine": machine, "sft": sft_rows, "reward_model": rm_rows})
    print_tables(results["sft"], results["reward_model"])
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {options.output}")


if __name__ == "__main__":
    main()
