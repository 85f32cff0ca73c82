"""One error type for bad input, and the CLI wrapper that turns it (and out-of-memory, accelerator and disk
errors) into one line and exit code 2."""

import errno
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Writing the output failed for a reason the user fixes outside the program.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
# What the CUDA runtime and its libraries put in front of their messages (torch raises them as RuntimeError, or
# as torch.AcceleratorError in recent versions).
ACCELERATOR_MARKS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS", "NCCL error", "device-side assert")


class PipelineError(Exception):
    """A problem the user can fix: the message names the file, the place and the fix."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None, stage: str = "",
            batch_options: str = "") -> None:
    """Run a stage's `main`. Users get one readable line instead of a traceback from deep inside a library;
    programming errors (anything else) still raise with their traceback so they can be reported. `stage` and
    `batch_options` (the options that size its batches) name what to change when the GPU runs out of memory."""
    finished = False
    try:
        main(argv)
        finished = True
    except PipelineError as err:
        fail(f"error: {err}")
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        fail(f"error: cannot write {err.filename or 'the output'}: {err.strerror}; free space or fix permissions, "
             "then run again (a stage resumes from its last checkpoint)")
    except KeyboardInterrupt:
        print("interrupted: no output was marked complete", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as err:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(err, torch.OutOfMemoryError):
            fail(f"error: {stage}: out of GPU memory ({first_line(err)}); lower {batch_options} and run again "
                 "(a stage resumes from its last checkpoint)")
        if not any(mark in str(err) for mark in ACCELERATOR_MARKS):
            raise
        log = Path(tempfile.gettempdir()) / f"rlhf-{stage}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text("".join(traceback.format_exception(err)))
        fail(f"error: {stage}: the accelerator failed ({first_line(err)}); full log in {log}; no output was marked "
             "complete")
    finally:
        end_processes(finished)


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def fail(line: str) -> None:
    print(line, file=sys.stderr)
    sys.exit(2)  # run_cli's `finally` still leaves the process group


def end_processes(finished: bool) -> None:
    """Leave the process group (if this run joined one) before the interpreter exits. A process that leaves a
    gloo group while another still works in it (process 1 done while process 0 writes the checkpoint) can
    abort ("terminate called without an active exception"), so after a finished run all processes wait for
    each other first. After an error they do not: the launcher stops the others."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
