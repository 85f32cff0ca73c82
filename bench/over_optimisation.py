"""How far to run PPO: the default PPO for a multiple of its updates, with the gold judge's and the reward
model's held-out scores at each periodic evaluation against sqrt(KL from SFT), the axis on which Gao et al.
2022 saw the gold score peak while the proxy reward keeps rising. Prints a markdown table and where the gold
score peaked; writes bench/over_optimisation.json and bench/over_optimisation.png.

Usage:
    python bench/over_optimisation.py                        # after make ppo: 32 updates, about 45 min on 2 cores
    python bench/over_optimisation.py --num_updates 48
    python bench/over_optimisation.py --kl_coef 0.01 --output_dir runs/default/ppo_kl001 \
        --output bench/over_optimisation_kl001.json                                  # other PPO options
    make bench-overopt ARGS="--run runs/mine --config configs/mine.yaml"

Protocol: the config's ppo section as `make ppo` runs it (the run's SFT policy, RM and PPO prompts, the same
seed); only num_updates changes, and any further option given here (say --kl_coef) goes to PPO. The learning
rate decays linearly to 0 over the whole run, so from update 1 on a longer run takes larger steps than the
default does at the same update. Each reading is the config's periodic evaluation (num_eval_prompts held-out
prompts, every eval_every updates). The run folder resumes like any PPO stage: a killed benchmark picks up at
its last saved update.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from harness import DEFAULT, ROOT, machine_facts

sys.path.insert(0, str(ROOT))
from evaluation.report import plot_over_optimisation  # noqa: E402  (the project root is on the path now)


def readings(folder: Path) -> list[dict]:
    """The periodic held-out evaluations of a PPO run: update, KL, reward (normalised RM score), judge."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{"update": row["update"], "kl": row["eval/kl"], "reward": row["eval/reward"],
             "judge": row["eval/judge_score"]} for row in rows if "eval/judge_score" in row]


def peak(rows: list[dict]) -> dict:
    """Where the judge peaked and what the reward model said after that point."""
    best = max(rows, key=lambda row: row["judge"])
    return {"update": best["update"], "judge": best["judge"], "kl": best["kl"],
            "last_update": rows[-1]["update"], "judge_at_end": rows[-1]["judge"],
            "reward_gain_after_peak": rows[-1]["reward"] - best["reward"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--run", default="runs/default", help="a run folder after `make ppo` (sft, rm, data)")
    parser.add_argument("--config", default=str(DEFAULT), help="the config the run was made with")
    parser.add_argument("--num_updates", type=int, default=32, help="PPO updates (the default config runs 16)")
    parser.add_argument("--output_dir", default="", help="the long PPO run's folder (default: <run>/ppo_long)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("over_optimisation.json")))
    options, ppo_options = parser.parse_known_args()
    run = ROOT / options.run
    folder = Path(options.output_dir) if options.output_dir else run / "ppo_long"
    # Streamed, not captured: the run takes most of an hour and shows its progress bar.
    command = [sys.executable, "-m", "ppo", "--config", options.config, "--policy", str(run / "sft"),
               "--reward_model", str(run / "rm"), "--prompts", str(run / "data" / "prompts_ppo.jsonl"),
               "--output_dir", str(folder), "--num_updates", str(options.num_updates), *ppo_options]
    if subprocess.run(command, cwd=ROOT).returncode:
        sys.exit(f"bench: the PPO run into {folder} failed (its error is above)")

    rows = readings(folder)
    found = peak(rows)
    print("\n| update | KL from SFT | sqrt(KL) | reward PPO maximises (normalised RM) | gold judge score |\n"
          "| --- | --- | --- | --- | --- |")
    for row in rows:
        mark = " (peak)" if row["update"] == found["update"] else ""
        print(f"| {row['update']} | {row['kl']:.2f} | {math.sqrt(max(row['kl'], 0.0)):.2f} | {row['reward']:.3f} "
              f"| {row['judge']:.3f}{mark} |")
    if found["update"] == found["last_update"]:
        print(f"\ngold judge: no peak yet, highest at the last reading ({found['judge']:.3f}, KL {found['kl']:.2f}); "
              "a longer run (--num_updates) or a smaller kl_coef would show where it turns")
    else:
        print(f"\ngold judge peaked at update {found['update']} of {found['last_update']} ({found['judge']:.3f}, KL "
              f"{found['kl']:.2f}); at the end {found['judge_at_end']:.3f}, while the RM's reward moved "
              f"{found['reward_gain_after_peak']:+.3f} after the peak")
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    plot_over_optimisation({"ppo": ""}, {"ppo": {"path": str(folder)}}, Path(options.output).with_suffix(".png"))
    settings = {"run": options.run, "config": options.config, "num_updates": options.num_updates,
                "ppo_options": ppo_options}
    Path(options.output).write_text(json.dumps({"machine": machine_facts(), "settings": settings,
                                                "readings": rows, "peak": found}, indent=2) + "\n")
    print(f"bench: wrote {options.output} and {Path(options.output).with_suffix('.png')}")


if __name__ == "__main__":
    main()
