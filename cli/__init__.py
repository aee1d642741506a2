"""The ``normstats`` command line: thin click commands over the library.

Exit codes:

- 0: success;
- 1: bad data (an input file's content, a stats file that does not fit);
- 2: bad usage (options, paths, an existing output without ``--force``);
- 130: interrupted (Ctrl-C or SIGTERM); no output file is left behind.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from normstats import __version__
from normstats.errors import NormstatsError

INTERRUPTED = 130


class CommandError(click.ClickException):
    """A library error, shown as one line ``Error: <message>``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class NormstatsGroup(click.Group):
    """Maps every library error to ``Error: ...`` and its exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            # SIGTERM unwinds like Ctrl-C, so temporaries are removed on the way out.
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            return super().invoke(ctx)
        except NormstatsError as error:
            raise CommandError(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            # An output is renamed into place only when complete, so this holds at any moment.
            raise CommandError("interrupted; no partial output was written", INTERRUPTED) from None
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away: nothing left to report to
            raise CommandError("output pipe closed", 1) from None
        except OSError as error:  # the system refused a read or write (disk full, permissions)
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


from . import commands, interop  # noqa: E402  (register the commands on `cli`)


def main() -> None:
    """Entry point of the ``normstats`` console script."""
    cli(prog_name="normstats")


__all__ = ["cli", "main", "commands", "interop"]
