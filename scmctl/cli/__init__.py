"""The `scmctl` command line: one module per subcommand, no math here.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 unexpected failure.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer

from scmctl.errors import UsageError

app = typer.Typer(
    name="scmctl",
    help="Train, distill, sample, refine and evaluate continuous-time consistency models (sCM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its command(s) to `app`; imports stay cheap (torch is imported lazily inside).
    from scmctl.cli import train, sample, refine, eval as eval_cmd, data, import_, ema, plot  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps UsageError to exit code 2 with one line on stderr."""
    _register()
    from scmctl import progress
    from scmctl.cli.common import rich_bar

    progress.use(rich_bar)  # the core reports progress; the CLI draws it
    # PyTorch's forward-AD loads TorchScript decompositions on first use and warns about its own
    # use of torch.jit.script; that is not actionable for a user.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    try:
        app(args=argv, prog_name="scmctl", standalone_mode=False)
    except UsageError as e:
        one_line = "; ".join(part.strip() for part in str(e).splitlines() if part.strip())
        print(f"error: {one_line}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors come as click.exceptions.UsageError
        try:  # typer >= 0.29 vendors click as typer._click; older typer raises click's own
            from typer._click import exceptions as click_exceptions
        except ImportError:
            from click import exceptions as click_exceptions

        if isinstance(e, click_exceptions.UsageError):
            msg = e.format_message().splitlines()[0] if e.format_message() else str(e)
            cmd = e.ctx.command_path if e.ctx else "scmctl"
            print(f"error: {cmd}: {msg}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, click_exceptions.ClickException):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code if e.exit_code else 1)
        if os.environ.get("SCMCTL_DEBUG"):
            raise
        print(f"error: unexpected failure: {e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
              " (set SCMCTL_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
