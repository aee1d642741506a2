"""The ``normstats`` click group: every failure mapped, in one place, to one line.

Exit codes:

- 0: success;
- 1: bad data (an input file's content, a stats file that does not fit), or
  the system refused the work (disk full, out of memory, a worker died);
- 2: bad usage (options, paths, an existing output without ``--force``);
- 130: interrupted (Ctrl-C or SIGTERM); no output file is left behind;
- 141: the reader of standard output went away (``normstats inspect x.npz | head -1``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, Iterator

import click

from normstats import __version__
from normstats.errors import NormstatsError

from .report import start_clock

INTERRUPTED = 130
PIPE_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a reader that went away
INTERRUPTED_MESSAGE = "interrupted; no partial output was written"


class CommandError(click.ClickException):
    """A library error, shown as one line ``Error: <message>``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def terminate(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporaries are removed on the way out."""
    raise KeyboardInterrupt


def silence_stdout() -> None:
    """Point standard output at /dev/null, so nothing more is written (or flushed) to a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real descriptor (a test runner's buffer)
        pass


@contextlib.contextmanager
def _user_ends() -> Iterator[None]:
    """A Ctrl-C, or a closed stdout (the reader went away: nothing left to report to),
    as the command's exit."""
    try:
        yield
    except KeyboardInterrupt:
        # An output is placed only when complete, so this holds at any moment.
        raise CommandError(INTERRUPTED_MESSAGE, INTERRUPTED) from None
    except BrokenPipeError:  # also --help / --version into a closed pipe (click would exit 1)
        silence_stdout()
        raise click.exceptions.Exit(PIPE_CLOSED) from None


class NormstatsGroup(click.Group):
    """Maps every library error to ``Error: ...`` and its exit code, in one place."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _user_ends():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        start_clock()
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, terminate)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            with _user_ends():
                return super().invoke(ctx)
        except NormstatsError as error:
            raise CommandError(str(error), error.exit_code) from None
        except MemoryError:
            raise CommandError("out of memory: the work needs more than this machine (or ulimit -v) "
                               "allows; use a smaller --batch-size or fewer classes, or free memory", 1) from None
        except OSError as error:  # the system refused a read or write (permissions, I/O error)
            where = f"{error.filename}: " if error.filename else ""
            raise CommandError(f"{where}{error.strerror or error}", 1) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=NormstatsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="normstats")
def cli() -> None:
    """Streaming BatchNorm statistics and class centers over files larger than memory.

    \b
    normstats fit-bn      features.h5:images -o stats.npz
    normstats fit-centers features.npy --labels labels.npy --num-classes 10 -o centers.npz
    normstats apply       stats.npz features.npy -o normalized.npy
    normstats export      stats.npz --to torch|keras|kaldi|espnet -o FILE

    Run 'normstats COMMAND --help' for the options of each command.
    """
