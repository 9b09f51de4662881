"""Running the ebood CLI in-process in tests, and what every CLI error must look like."""

from __future__ import annotations

from typer.testing import CliRunner

from ebood.cli import app, load_commands

load_commands()
RUNNER = CliRunner()


def run(*args, **kwargs):
    """``ebood ARGS...`` in this process (arguments converted to strings), as typer's CliRunner result."""
    return RUNNER.invoke(app, [str(a) for a in args], **kwargs)


def assert_one_line_error(res, *fragments):
    """The command failed with a handled error: one line ``ebood: error: ...`` holding every fragment."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), f"crashed: {res.exception!r}"  # handled, not a crash
    assert res.output.startswith("ebood: error:") and res.output.count("\n") == 1, res.output
    assert "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in res.output, res.output
