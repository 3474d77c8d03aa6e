"""The one place where reading a user-supplied file (a config, checkpoint, cache, result, YAML)
turns any failure into a one-line error naming the file: `with reading(path, "--config"): ...`.

Entry points print `UserError`s (and every `ValueError`) as `error: ...` and exit 2, without a
traceback; `WKVAQ_DEBUG=1` (or `--debug`) shows it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import sys
from typing import Callable, Iterator

__all__ = ["MAX_MESSAGE", "UserError", "UserFileError", "debug_enabled", "reading", "run_cli", "short"]

MAX_MESSAGE = 300
"""Characters of an underlying error kept in the one-line message (a YAML bomb's repr is megabytes)."""


class UserError(RuntimeError):
    """A failure the user can fix that is not a bad value (data unavailable, a non-finite loss):
    printed as one line, exit 2."""


class UserFileError(ValueError):
    """A user-supplied file that cannot be read as what it should be."""


def short(text: object, limit: int = MAX_MESSAGE) -> str:
    """The first line of `text`, at most `limit` characters."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Re-raise anything raised while reading or parsing `path` as one UserFileError line that names
    `what` (the flag or role) and the file; ValueErrors that already name it pass through."""
    try:
        yield
    except UserFileError:
        raise
    except (MemoryError, RecursionError) as err:
        raise UserFileError(f"{what} {path}: too large or too deeply nested to read "
                            f"({type(err).__name__})") from None
    except ValueError as err:
        if str(path) in str(err):  # it names the file already; name the flag too
            msg = short(err, 2 * MAX_MESSAGE)
            raise UserFileError(msg if msg.startswith(what) else f"{what}: {msg}") from None
        raise UserFileError(f"{what} {path}: {short(err)}") from None
    except Exception as err:  # noqa: BLE001 - the point: any failure of a user's file is a user error
        raise UserFileError(f"{what} {path}: cannot be read ({type(err).__name__}: {short(err)})") from None


def debug_enabled(argv: list[str] | None = None) -> bool:
    """Tracebacks wanted: WKVAQ_DEBUG=1 in the environment (or --debug among the arguments)."""
    return os.environ.get("WKVAQ_DEBUG", "") not in ("", "0") or "--debug" in (argv or [])


def run_cli(body: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run an entry point's body: a user error (ValueError and the project's own error types) is one
    line `error: ...` and exit 2; anything else one line naming the exception type and exit 1, with
    WKVAQ_DEBUG=1 (or --debug) for the traceback; Ctrl-C exits 130."""
    try:
        return body()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns failures into messages
        if debug_enabled(argv):
            raise
        if isinstance(err, (ValueError, UserError, OSError)):
            print(f"error: {short(err, 4 * MAX_MESSAGE)}", file=sys.stderr)
            return 2
        print(f"error: {type(err).__name__}: {short(err, 4 * MAX_MESSAGE)} (an unexpected failure; rerun with "
              f"WKVAQ_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
