"""Test helpers: run the CLI in-process, check one-line errors, build pickle code payloads."""

from scmctl.cli import main


def exit_code(*args) -> int:
    """Run `scmctl ARGS` in-process; its exit code."""
    try:
        main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)


def run(capsys, *args):
    """Run `scmctl ARGS` in-process: (exit code, stdout, stderr)."""
    code = exit_code(*args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    """Exit code 2, exactly one stderr line starting 'error:', no traceback, containing `needles`."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


class Payload:
    """Unpickling this calls ``func(*args)``: the classic pickle code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args
