"""The checkpoint contract: atomic stage folders with a `pipeline.json` manifest.

A stage writes into `<RUN>/.<name>.partial/` and renames it to `<RUN>/<name>/` only after the manifest
is written, so a folder with a `pipeline.json` is always complete, and a killed run leaves only a
`.partial` folder that the next run discards. The manifest records what went in (paths, sha256,
parent manifests), the resolved config, final metrics, library versions, git commit and times, and a
fingerprint of the inputs that lets a rerun skip a stage whose inputs did not change.
"""

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from common.errors import PipelineError

MANIFEST = "pipeline.json"
# Inside a partial folder: the state a killed run resumes from (trainer or PPO checkpoints).
RESUME = "resume"
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def describe_input(source: str) -> dict[str, Any]:
    """A data input: local files and folders get a sha256, anything else is recorded as a hub name."""
    path = Path(source)
    if path.exists():
        return {"path": str(path.resolve()), "sha256": sha256_path(path)}
    return {"hub": source}


def describe_parent(model: str) -> dict[str, Any]:
    """A parent checkpoint: its manifest's hash when it is one of ours, else its path or hub id."""
    manifest = Path(model) / MANIFEST
    if manifest.is_file():
        return {"path": str(Path(model).resolve()), "manifest_sha256": sha256_path(manifest)}
    return describe_input(model)


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return None


def fingerprint(config: Any, inputs: dict[str, Any]) -> str:
    """Hash of everything that determines a stage's output; the output path itself is left out."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_dir", "force")}
    blob = json.dumps({"config": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def up_to_date(output_dir: str | Path, print_: str) -> bool:
    manifest = read_manifest(output_dir)
    return manifest is not None and manifest.get("fingerprint") == print_


def skip_unchanged(stage: str, config: Any, print_: str) -> bool:
    """Whether `config.output_dir` already holds this exact work (unless `--force`): then say so, once per launch."""
    if config.force or not up_to_date(config.output_dir, print_):
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{stage}: {config.output_dir} is up to date (inputs unchanged); pass --force true to run it again")
    return True


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


class StagedOutput:
    """A stage's output folder, built under a `.partial` name and renamed into place when complete."""

    def __init__(self, output_dir: str | Path, stage: str):
        self.final = Path(output_dir)
        self.staging = self.final.parent / f".{self.final.name}.partial"
        self.stage = stage
        self.started = time.time()

    def check(self, need_bytes: int = 0) -> None:
        """Before any work: the destination can be created, is writable and has room for `need_bytes`
        (a stage's estimate of its checkpoint and resume state). Changes nothing but the parent folder."""
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"cannot create output folder {parent}: {err.strerror}; choose another RUN=") from None
        if not os.access(parent, os.W_OK):
            raise PipelineError(f"output folder {parent} is not writable; fix its permissions or choose another RUN=")
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise PipelineError(f"output folder {parent} has {free / 2**30:.1f} GiB free, but this stage writes about "
                                f"{need_bytes / 2**30:.1f} GiB (checkpoint and resume state); free some space or "
                                "choose another RUN=")

    def open(self, keep: bool = False, need_bytes: int = 0) -> Path:
        """Check the destination, discard a killed run's leftovers (unless `keep`: a stage that resumes from
        a checkpoint inside them), create the staging folder."""
        self.check(need_bytes)
        if self.staging.exists() and not keep:
            shutil.rmtree(self.staging)
        self.staging.mkdir(exist_ok=True)
        return self.staging

    def commit(self, config: Any, inputs: dict[str, Any], metrics: dict[str, Any], print_: str) -> Path:
        """Drop the resume state (a finished run needs none), write the manifest last, then swap the staging
        folder into place."""
        shutil.rmtree(self.staging / RESUME, ignore_errors=True)
        manifest = {
            "stage": self.stage,
            "fingerprint": print_,
            "inputs": inputs,
            "config": dataclasses.asdict(config),
            "metrics": metrics,
            "versions": library_versions(),
            "git_commit": git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - self.started, 1),
        }
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        previous = self.final.parent / f".{self.final.name}.previous"
        if self.final.exists():
            if previous.exists():
                shutil.rmtree(previous)
            self.final.rename(previous)
        self.staging.rename(self.final)
        shutil.rmtree(previous, ignore_errors=True)
        return self.final


def require_checkpoint(path: str, what: str, fix: str) -> None:
    """A local parent checkpoint must exist and be complete (have its manifest or at least a config)."""
    folder = Path(path)
    looks_local = folder.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if not looks_local:
        return  # a hub id: from_pretrained reports it if it cannot be found
    if not folder.is_dir():
        raise PipelineError(f"{what} {path} does not exist; {fix}")
    if not (folder / MANIFEST).is_file() and not (folder / "config.json").is_file() \
            and not (folder / "adapter_config.json").is_file():
        raise PipelineError(f"{what} {path} is incomplete (no {MANIFEST} or config.json); {fix}")
