"""One error type for bad input, and the CLI wrapper that turns it into one line and exit code 2."""

import errno
import sys
from collections.abc import Callable

# Writing the output failed for a reason the user fixes outside the program.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class PipelineError(Exception):
    """A problem the user can fix: the message names the file, the place and the fix."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    # Users get one readable line instead of a traceback from deep inside a library; programming
    # errors (anything else) still raise with their traceback so they can be reported.
    try:
        main(argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        print(f"error: cannot write {err.filename or 'the output'}: {err.strerror}; free space or fix permissions, "
              "then run again (a stage resumes from its last checkpoint)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output was marked complete", file=sys.stderr)
        sys.exit(130)
