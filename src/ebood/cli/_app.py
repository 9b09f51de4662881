"""The typer application shared by every command module, and the one-line error policy."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, NoReturn, TypeVar

import typer

app = typer.Typer(
    name="ebood",
    help="Energy-based out-of-distribution detection: score, fit detectors, evaluate, train, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

#: Errors that are the user's input, not a bug: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, LookupError)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``ebood: error: message`` on stderr and exit with ``code``."""
    typer.echo(f"ebood: error: {message}", err=True)
    raise typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__
    return text


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` whose user errors become one line on stderr and a non-zero exit."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except typer.Exit:
                raise
            except KeyboardInterrupt:
                typer.echo("ebood: interrupted", err=True)
                raise typer.Exit(130) from None
            except USER_ERRORS as exc:
                fail(_one_line(exc))

        app.command(*args, **kwargs)(run)
        return fn

    return wrap


def bare_ray_flag(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional ADDRESS: a bare ``--ray`` (last, or followed by an option or by
    something that is not an address, such as the input file) becomes ``--ray local``.
    Addresses are ``local``, ``auto``, ``ray://...`` or ``HOST:PORT``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or not _looks_like_address(nxt):
                out.append("local")
    return out


def _looks_like_address(text: str) -> bool:
    if text in ("local", "auto") or "://" in text:
        return True
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and "/" not in host)


def main() -> None:
    """Entry point of the ``ebood`` console script."""
    from . import load_commands

    load_commands()
    app(args=bare_ray_flag(sys.argv[1:]), prog_name="ebood")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
