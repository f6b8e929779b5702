"""How a failed run says why: one line, the last one of the run's log.

When the ServerApp raises, Flower's executor (`flwr-simulation`, or `flwr-serverapp` in a
deployment) logs the traceback, then a generic "Exit Code: 700 / 201" block, marks the run
failed (the exception's text becomes its status details, `flwr ls --run-id <id>`) and uploads
the log. `reason_logged_last` adds the reason after that block: it registers a Flower exit
handler, and Flower runs exit handlers last-in first-out, so this one logs before the
executor's own handler uploads the remaining log. A user of plain `flwr run --stream` thus
reads the reason (key, value, what is allowed) as the last line on the console.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import ERROR

from flwr.common import log

from .config import ConfigError
from .results import CheckpointError

# Errors whose message is already the whole story (they name the run-config key).
PLAIN_ERRORS = (ConfigError, CheckpointError)
PREFIX = "fedbat-flwr: run failed:"


def one_line(exc: BaseException) -> str:
    """The reason as one line: the message of an error that names its key; otherwise the
    exception's type and the last line of its message (the traceback is in the log)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[-1].strip() if lines else ""
    if isinstance(exc, PLAIN_ERRORS) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _add_exit_handler() -> Callable[[Callable[[], None]], None] | None:
    """Flower's exit-handler registry (flwr 1.41/1.42), or None if this Flower lacks it."""
    try:
        from flwr.supercore.exit import add_exit_handler
    except ImportError:
        return None
    return add_exit_handler


@contextmanager
def reason_logged_last() -> Iterator[None]:
    """Run the block; if it raises, log the one-line reason after Flower's exit message, then
    let the exception end the run as failed. Without Flower's exit handlers (another Flower
    version) the reason is logged at once instead."""
    try:
        yield
    except Exception as exc:
        line = f"{PREFIX} {one_line(exc)}"
        add = _add_exit_handler()
        if add is None:
            log(ERROR, line)
        else:
            add(lambda: log(ERROR, line))
        raise
