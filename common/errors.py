"""One error type for bad input, and the CLI wrapper that turns it into one line and exit code 2."""

import sys
from collections.abc import Callable


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
    except KeyboardInterrupt:
        print("interrupted: no output was marked complete", file=sys.stderr)
        sys.exit(130)
