"""Run the CLI in-process from tests."""

from scmctl.cli import main


def run(capsys, *args):
    """Run `scmctl ARGS` in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
