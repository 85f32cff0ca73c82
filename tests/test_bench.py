"""The benchmarks' own parts that a GPU run depends on, checked on the CPU: the sampling benchmark times the
same work on every backend, and GPU utilisation is read from nvidia-smi."""

import importlib
import os
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import CPU, ROOT


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    yield importlib.import_module("harness"), importlib.import_module("sampling")
    for name in ("harness", "sampling"):
        sys.modules.pop(name, None)


def test_sampling_bench_times_every_backend_on_the_same_work(make_run, bench_modules):
    _, sampling = bench_modules
    tokenizer = AutoTokenizer.from_pretrained(make_run / "sft")
    model = AutoModelForCausalLM.from_pretrained(make_run / "sft").eval()
    result = sampling.measure(model, tokenizer, rows=3, new_tokens=5, repeats=2, compute=CPU)
    assert set(result) == {"generate", "eager", "compiled"}
    for backend in result.values():
        assert len(backend["seconds"]) == 2 and backend["tokens_per_second"] == 15 / backend["median_seconds"]
        assert backend["gpu_utilisation"] is None and backend["peak_mib"] is None  # no GPU here


def test_gpu_utilisation_is_the_mean_of_nvidia_smi_samples(bench_modules, tmp_path, monkeypatch):
    harness, _ = bench_modules
    with harness.GpuMonitor() as monitor:
        pass
    assert monitor.mean_utilisation is None  # no nvidia-smi on this machine
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 40\necho 90\necho 80\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with harness.GpuMonitor() as monitor:
        time.sleep(0.5)
    assert monitor.mean_utilisation == pytest.approx(70.0)
