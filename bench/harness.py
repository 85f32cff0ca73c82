"""What every benchmark here shares: paths, running a command as its own process with its peak memory, medians
of repeated runs and the facts of the machine they ran on."""

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
TINY = ROOT / "configs" / "tiny.yaml"
DEFAULT = ROOT / "configs" / "default.yaml"


def run(command: list[str]) -> None:
    """Run a preparation step; stop the benchmark with its output when it fails."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"bench: {' '.join(command[:4])} ... failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")


def peak_rss_of(command: list[str]) -> tuple[str, float]:
    """Run a command; its stdout and its peak resident memory in MiB (from wait4, this child only)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"bench: {' '.join(command[:4])} ... failed:\n{stderr[-3000:]}")
    return stdout, usage.ru_maxrss / 1024


def medians(runs: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in keys}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    import torch

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: metadata.version(name) for name in ("transformers", "trl", "accelerate", "peft")},
    }


class GpuMonitor:
    """Mean GPU utilisation over a `with` block, from `nvidia-smi` sampling every 100 ms in a child process;
    None on a machine without an NVIDIA GPU (or a block too short for one sample)."""

    def __enter__(self) -> "GpuMonitor":
        self.mean_utilisation: float | None = None
        self.process = None
        if shutil.which("nvidia-smi"):
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # the one torch calls cuda:0
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100",
                     "-i", gpu]
            self.process = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        samples = [float(line) for line in self.process.communicate()[0].split() if line.replace(".", "").isdigit()]
        self.mean_utilisation = statistics.fmean(samples) if samples else None
