"""The typer application shared by every command module, and the one-line error policy."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence, TypeVar

import typer
import typer.core

app = typer.Typer(
    name="ebood",
    help="Energy-based out-of-distribution detection: score, fit detectors, evaluate, train, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: it wraps long values (data specs, paths) where rich's panels cut them to "…"
    rich_markup_mode=None,
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


#: Spellings kept for one release after a rename: old option -> the tokens that replace it.
Renames = Mapping[str, Sequence[str]]


def rename_deprecated(args: list[str], renamed: Renames, command_name: str) -> list[str]:
    """``args`` with every deprecated option spelling replaced, and a note on stderr for each.

    ``--old VALUE``, ``--old=VALUE`` and (for one-letter options) ``-oVALUE`` are recognised;
    nothing after ``--`` is touched.
    """
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            out.extend(args[i:])
            break
        old, new, rest = _match_renamed(arg, renamed)
        if old is None:
            out.append(arg)
            continue
        typer.echo(f"ebood: warning: `ebood {command_name} {old}` is deprecated and will be removed in the next "
                   f"release; use {' '.join(new)}", err=True)
        out.extend(new)
        if rest is not None:
            out.append(rest)
    return out


def _match_renamed(arg: str, renamed: Renames) -> tuple[str | None, Sequence[str], str | None]:
    for old, new in renamed.items():
        if arg == old:
            return old, new, None
        if old.startswith("--") and arg.startswith(old + "="):
            return old, new, arg[len(old) + 1:]
        if len(old) == 2 and not old.startswith("--") and arg.startswith(old) and len(arg) > 2:
            return old, new, arg[2:]
    return None, (), None


def _command_class(renamed: Renames) -> type[typer.core.TyperCommand]:
    """A click command that accepts the deprecated spellings in ``renamed`` (hidden from --help)."""

    class Command(typer.core.TyperCommand):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            return super().parse_args(ctx, rename_deprecated(args, renamed, ctx.info_name or self.name or ""))

    return Command


def command(*args: Any, renamed: Renames | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` whose user errors become one line on stderr and a non-zero exit.

    ``renamed`` maps old option spellings to their replacement (e.g. ``{"--out": ["--output"]}``):
    they keep working for one release, with a deprecation note on stderr.
    """
    if renamed:
        kwargs["cls"] = _command_class(renamed)

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


_PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: categories ebood never issues: another library telling its own users about its API
_THEIR_NOTICES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def echo_warnings(caught: list[warnings.WarningMessage], verbose: bool = False) -> None:
    """Print warnings recorded during a command: ebood's own as one ``ebood: warning:`` line each;
    other libraries' (Ray, torch ...) with their own label, their deprecation notices only when
    ``verbose``. Repeats are printed once."""
    seen: set[str] = set()
    for w in caught:
        if issubclass(w.category, _THEIR_NOTICES):
            if not verbose:
                continue
            line = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, "").rstrip()
        elif _in_ebood(w.filename):
            text = str(w.message).strip()
            line = f"ebood: warning: {text.splitlines()[0] if text else w.category.__name__}"
        else:
            line = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, "").rstrip()
        if line not in seen:
            seen.add(line)
            typer.echo(line, err=True)


def _in_ebood(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _print_version(value: bool) -> None:
    if value:
        from .._version import __version__

        typer.echo(f"ebood {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print ebood's version and exit."),
) -> None:
    """Energy-based out-of-distribution detection: score, fit detectors, evaluate, train, benchmark."""


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
