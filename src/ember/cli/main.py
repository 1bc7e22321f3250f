"""The `ember` command: dispatches to one module per command.

Errors never show a traceback: an EmberError or a usage mistake prints one line on stderr and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from ember import __version__
from ember.cli import batch as batch_command
from ember.cli import bench as bench_command
from ember.cli import models as model_commands
from ember.cli import run as run_command
from ember.cli import schedule as schedule_commands
from ember.cli import serving as serving_commands
from ember.cli import top as top_command
from ember.cli import worker as worker_command
from ember.config import Settings
from ember.errors import EmberError

app = typer.Typer(
    name="ember",
    help="A local LLM runtime: run GGUF models on CPU or GPU through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"ember version {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-v", help="Print the version and exit.", callback=_show_version, is_eager=True
    ),
) -> None:
    """A local LLM runtime: run GGUF models on CPU or GPU through llama.cpp."""


run_command.register(app)
model_commands.register(app)
serving_commands.register(app)
bench_command.register(app)
batch_command.register(app)
worker_command.register(app)
schedule_commands.register(app)
top_command.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    logging.basicConfig(level=Settings().log_level.upper(), format="ember: %(levelname)s: %(message)s")
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = app(args=args or ["--help"], prog_name="ember", standalone_mode=False)
    except EmberError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    except typer.TyperException as error:  # a usage mistake: unknown flag, bad value, missing argument
        command = args[0] if args and not args[0].startswith("-") else ""
        hint = f"; see `ember {command} --help`" if command else "; see `ember --help`"
        print(f"Error: {error.format_message()}{hint}", file=sys.stderr)
        return error.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ember run ... | head -1`): not an error. Silence the final flush too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # the disk is full, a file vanished, a permission is missing
        print(f"Error: {error.strerror or error}{f': {error.filename}' if error.filename else ''}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: one line for the user, the traceback in the debug log
        logging.getLogger("ember").debug("unexpected error", exc_info=True)
        print(
            f"Error: unexpected {type(error).__name__}: {error} (run with EMBER_LOG_LEVEL=DEBUG for details)",
            file=sys.stderr,
        )
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
