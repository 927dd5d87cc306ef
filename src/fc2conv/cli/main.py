"""The ``fc2conv`` command: a click group whose subcommands are imported only when run.

Exit codes: 0 success; 1 a verdict of "different" (``compare``, ``convert --check``);
2 a usage or input error, reported as one line on stderr with no traceback; 128+N when
signal N (SIGINT, SIGTERM, SIGHUP) stopped the run (outputs are then absent or whole).

:func:`main` is the one boundary where every error becomes one line: ``Fc2ConvError``
sentences as they are, ``OSError`` (disk full, permissions) and foreign libraries' validation
errors through :mod:`fc2conv.errors`, and anything unexpected as "internal error" with its
reason (``-vv`` shows the traceback).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from fc2conv.errors import Fc2ConvError, Interrupted, file_error, reason

# Subcommand name -> "module:attribute" of its click.Command. Keeping them lazy means
# `fc2conv --help` and `fc2conv demo` never import onnx.
COMMANDS: dict[str, str] = {
    "compare": "fc2conv.cli.compare:compare_command",
    "convert": "fc2conv.cli.convert:convert",
    "convolutionalize": "fc2conv.cli.torch_commands:convolutionalize",
    "demo": "fc2conv.cli.demo:demo",
    "dense": "fc2conv.cli.dense:dense",
    "explain": "fc2conv.cli.explain:explain",
}

EPILOG = """\b
Examples:
  fc2conv demo                      walk through the Linear <-> conv equivalence
  fc2conv explain --linear 9216x4096 --in-shape 256x6x6
  fc2conv COMMAND --help            options and examples of one command
"""


VERBOSE = 0


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fc2conv")
@click.option("-v", "--verbose", count=True, help="Log what fc2conv does (-vv for debug).")
def cli(verbose: int) -> None:
    """fc2conv: exact, verified translations between fully connected layers and convolutions."""
    global VERBOSE
    VERBOSE = verbose
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:  # foreign libraries log tracebacks (exc_info): one line each unless -vv
        for handler in logging.getLogger().handlers:
            handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))


def fail(message: str) -> None:
    """Print ``fc2conv: error: <message>`` on stderr and exit with status 2."""
    click.echo(f"fc2conv: error: {message}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script and of ``python -m fc2conv``."""
    try:
        return cli.main(args=argv, prog_name="fc2conv", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: one line, exit 2
        click.echo(f"fc2conv: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except Fc2ConvError as exc:
        fail(one_line(str(exc)))
    except OSError as exc:
        fail(one_line(str(file_error(exc))))
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Interrupted as exc:
        click.echo(f"fc2conv: stopped by {exc.name}; outputs not finished were removed", err=True)
        sys.exit(128 + exc.signum)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, never a traceback
        if VERBOSE >= 2:
            raise
        if isinstance(exc, ValueError) and "path traversal" in str(exc):
            fail(one_line(f"refused external data: {reason(exc, with_type=False)}"))
        fail(one_line(f"internal error ({reason(exc)}); run with -vv for the traceback"))


class OneLineFormatter(logging.Formatter):
    """A log record as one line: no traceback, the exception's reason appended instead."""

    def format(self, record: logging.LogRecord) -> str:
        exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
        try:
            text = super().format(record)
        finally:
            record.exc_info = exc_info
        if exc_info and exc_info[1] is not None:
            text = f"{text} ({reason(exc_info[1])})"
        return one_line(text)


def one_line(message: str) -> str:
    """``message`` on one line: the CLI promises one line per error (whitespace runs become one
    space, other control characters from names inside a damaged file are escaped)."""
    text = " ".join(message.split())
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
