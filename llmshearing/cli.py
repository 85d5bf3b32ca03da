"""What every command of the project shares: one error line with the fix, exit status 2, ``--debug`` for the
traceback, and defaults shown in ``--help``.

An error of the user's input or environment (a missing file, a bad value, a model that cannot be pruned, an
unreadable checkpoint) is reported as ``error: <what, where, and how to fix it>`` on one line; anything else is a
bug and keeps its traceback.

    def main(argv=None) -> int:
        return run(_main, argv)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Optional

__all__ = ["HelpFormatter", "MAX_ERROR_CHARS", "one_line", "parser", "run", "user_errors"]

MAX_ERROR_CHARS = 1200


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the module docstring's layout and shows every default (unless the help text already says
    what the default is, or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def parser(description: Optional[str], prog: Optional[str] = None, **kwargs) -> argparse.ArgumentParser:
    """An argument parser with the shared formatter and ``--debug``; ``prog``: the command as a user types it
    (``python -m llmshearing.plots``)."""
    p = argparse.ArgumentParser(description=description, prog=prog, formatter_class=HelpFormatter, **kwargs)
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a problem with the user's input or environment (each names the fix)."""
    from llmshearing.checkpointing import CheckpointError
    from llmshearing.config import ConfigError
    from llmshearing.data.prepare import DataPrepError
    from llmshearing.hub import HubError
    from llmshearing.models.adapters import UnsupportedModel

    return (ConfigError, UnsupportedModel, CheckpointError, DataPrepError, HubError, FileNotFoundError,
            FileExistsError, NotADirectoryError, ValueError, ImportError)


def one_line(e: BaseException) -> str:
    """The message on one line, at most :data:`MAX_ERROR_CHARS` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 40] + f" ... ({len(text)} characters)"


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)``; an input error becomes ``error: ...`` on stderr and exit status 2 (``--debug``: raise)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except user_errors() as e:
        if "--debug" in args:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        print("(--debug shows the traceback)", file=sys.stderr)
        return 2
