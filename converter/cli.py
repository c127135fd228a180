"""The ``mtconvert`` command. Start-up imports click only: rich, numpy and every toolchain load
when a command needs them (a test proves it).

    mtconvert MODEL --to tflite,onnx-mobile     same as: mtconvert convert MODEL --to ...
    mtconvert backends
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from mtconvert.version import __version__
from mtconvert.backends.options import Option
from mtconvert import matrix_spec
from mtconvert.errors import EXIT_INTERNAL, EXIT_USAGE, MtConvertError

# --json: scripts read stdout; the console table goes to stderr (nowhere with -q)
JSON_STDOUT = Option("json", "bool", False, "Print the JSON report on stdout and nothing else "
                     "there; the console table goes to stderr (with -q, nowhere).",
                     modes=("convert", "validate", "verify"))


class DefaultGroup(click.Group):
    """A group whose first argument, when it is no command, is the model for ``convert``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


class SpecCommand(click.Command):
    """A command whose options come from the option spec: the run's own (given at definition)
    and, added the first time they are needed (help or parsing, never at start-up), those the
    registered backends declare for ``mode``."""

    def __init__(self, *args: Any, mode: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mode, self._backends_added = mode, False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._backends_added:
            self._backends_added = True
            from mtconvert.optspec import backend_options
            from mtconvert.registry import default_registry

            self.params.extend(click_option(o)
                               for o in backend_options(default_registry(), self.mode))
        return super().get_params(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        if not ctx.params.get(JSON_STDOUT.name):
            return super().invoke(ctx)
        with _stdout_to_stderr() as stdout:  # --json: whatever else prints goes to stderr
            ctx.meta["mtconvert.stdout"] = stdout
            return super().invoke(ctx)


def click_option(opt: Option) -> click.Option:
    """The click option of an Option. Values reach the API as given (strings, tuples): the
    spec parses them, so CLI, API and config file check values the same way."""
    decls = [opt.cli_flag, *([opt.short] if opt.short else []), opt.name]
    kw: dict[str, Any] = dict(help=opt.help, show_default=opt.show_default,
                              metavar=opt.metavar or ("PATH" if opt.kind in ("path", "data")
                                                      else None))
    if opt.kind == "bool":
        kw |= dict(is_flag=True, default=opt.default, flag_value=not opt.default,
                   show_default=False)
    elif opt.repeatable:
        kw |= dict(multiple=True)
    elif opt.kind == "choice":
        kw |= dict(type=click.Choice([str(c) for c in opt.choices]), default=opt.default)
    else:
        kw |= dict(type={"int": int, "float": float}.get(opt.kind), default=opt.default)
    return click.Option(decls, **kw)


def spec_command(group: click.Group, name: str, mode: str, arguments: list[click.Argument],
                 doc: str) -> Any:
    """Register ``name`` on ``group`` with the spec's options for ``mode``."""
    from mtconvert import optspec, render

    params = [*arguments, *map(click_option, [*optspec.core(mode), *render.options(mode),
                                              *optspec.PRESENTATION, JSON_STDOUT])]

    def decorate(f: Any) -> Any:
        cmd = SpecCommand(name, callback=f, params=params, help=doc, mode=mode)
        group.add_command(cmd)
        return f
    return decorate


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtconvert")
def cli() -> None:
    """Convert a PyTorch or ONNX Transformer to mobile targets and prove each artifact right.

    \b
    mtconvert MODEL --to onnx-mobile,tflite [--out DIR] [--report-json PATH]
    mtconvert validate SOURCE ARTIFACT...
    mtconvert verify BUNDLE_DIR
    mtconvert matrix ZOO.toml [--executor ray]
    mtconvert backends

    Exit codes: 0 every target passed, 1 a check failed, 2 usage error or unreadable model,
    3 a backend failed to convert or run, 4 internal error.
    """


_PATH = click.Path(path_type=Path)


@spec_command(cli, "convert", "convert", [click.Argument(["model"], type=_PATH)],
              "Convert MODEL (.onnx or .pt2) to each target and validate every artifact.")
def convert_cmd(model: Path, **values: Any) -> int:
    from mtconvert import api

    show, files, options = _split(values, "convert")
    with _progress(show) as progress:
        report = api.convert(model, options.pop("targets", None),
                             options.pop("out_dir", "build"), None, progress=progress, **options)
    return _finish(report, files)


@spec_command(cli, "validate", "validate",
              [click.Argument(["source"], type=_PATH),
               click.Argument(["artifacts"], nargs=-1, type=_PATH)],
              "Check ARTIFACTS built elsewhere (.tflite, .ort, .onnx, .mlpackage, .param) "
              "against SOURCE, without converting: the release gate. Same checks, report and "
              "exit codes as a conversion.")
def validate_cmd(source: Path, artifacts: tuple[Path, ...], **values: Any) -> int:
    from mtconvert import api

    show, files, options = _split(values, "validate")
    with _progress(show) as progress:
        report = api.validate(source, list(artifacts), progress=progress, **options)
    return _finish(report, files)


@spec_command(cli, "verify", "verify", [click.Argument(["bundle_dir"], type=_PATH)],
              "Re-check the artifacts of golden bundles (written by --bundle) against their "
              "stored inputs, reference outputs and tolerances, e.g. on a macOS CI worker. No "
              "source needed.")
def verify_cmd(bundle_dir: Path, **values: Any) -> int:
    from mtconvert import api

    show, files, options = _split(values, "verify")
    with _progress(show) as progress:
        report = api.verify(bundle_dir, progress=progress, **options)
    return _finish(report, files)


@spec_command(cli, "matrix", "matrix",
              [click.Argument(["matrix_file"], type=_PATH),
               *map(click_option, matrix_spec.CLI_OPTIONS)],
              "Run every model x target x precision cell of MATRIX_FILE (TOML: models, targets, "
              "precisions, run options) and write one combined report; each cell in a process "
              "of its own, locally or on Ray (--executor ray). Exit codes as for one run.")
def matrix_cmd(matrix_file: Path, **values: Any) -> int:
    from mtconvert import matrix_cli

    return matrix_cli.main(matrix_file, values,
                           click.get_current_context().meta.get("mtconvert.stdout"))


def _split(values: dict[str, Any], mode: str) -> tuple[dict[str, Any], dict[str, Any],
                                                     dict[str, Any]]:
    """(presentation, report files, run options). Run options and report files come from the
    config file (--config, or found in the current folder) overridden by those given on the
    command line; the rest is left to the API's defaults (the spec's)."""
    from click.core import ParameterSource

    from mtconvert import config, optspec, render
    from mtconvert.registry import default_registry

    ctx = click.get_current_context()
    show_names = {o.name for o in optspec.PRESENTATION} | {JSON_STDOUT.name}
    file_names = {o.name for o in render.options(mode)}
    show = {k: v for k, v in values.items() if k in show_names}
    given = {k: v for k, v in values.items() if k not in show_names
             and ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    path = values.get("config") or config.find(Path.cwd())
    merged = (config.load(path, mode, default_registry()) if path else {}) | given
    files = {k: v for k, v in merged.items() if k in file_names}
    options = {k: v for k, v in merged.items() if k not in file_names and v is not None}
    return show, files, options


def _progress(shared: dict[str, Any]) -> Any:
    """A live display per target on a terminal, plain lines with -v or in logs, none with -q
    (a context manager either way)."""
    import contextlib

    show = not shared["quiet"] and (shared["verbose"] or sys.stderr.isatty())
    if not show:
        return contextlib.nullcontext(None)
    from mtconvert.render.progress import Display

    return Display(live=sys.stderr.isatty())


def _finish(report: Any, files: dict[str, Any]) -> int:
    from mtconvert import render

    render.write_files(report, files)
    ctx = click.get_current_context()
    stdout = ctx.meta.get("mtconvert.stdout")
    if stdout is None:
        render.render("console", report, sys.stdout)
        return report.exit_code
    if not ctx.params.get("quiet"):  # --json
        render.render("console", report, sys.stderr)
    render.render("json", report, stdout)
    stdout.flush()
    return report.exit_code


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[IO[str]]:
    """Point stdout (the Python stream and file descriptor 1, which child processes and native
    libraries write to) at stderr; yield a stream on the real stdout."""
    sys.stdout.flush()
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        real = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield real
        return
    saved = os.dup(fd)
    real = os.fdopen(saved, "w", encoding="utf-8", closefd=False)
    os.dup2(err, fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        real.flush()
        os.dup2(saved, fd)
        real.close()
        os.close(saved)


def _console(stderr: bool) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 120  # logs and pipes: wide enough for the table
    return Console(stderr=stderr, highlight=False, width=width)


@cli.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backends_cmd(as_json: bool) -> int:
    """List the registered targets and whether they can convert and run here."""
    from mtconvert.backends_info import describe_backends

    rows = describe_backends()
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(header_style="bold")
    for col in ("target", "aliases", "precisions", "convert here", "run here", "tools", "note"):
        table.add_column(col)
    for r in rows:
        yes = lambda b: "[green]yes[/]" if b else "[red]no[/]"  # noqa: E731
        table.add_row(r["name"], ", ".join(r["aliases"]), ", ".join(r["precisions"]),
                      yes(r["can_convert"]), yes(r["can_run"]),
                      ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
                      r["install_hint"] or r["error"] or r["reason"] or "")
    _console(stderr=False).print(table)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # OpenMP's default wait (spin, then sleep) makes a 2-thread PyTorch reference 100-500x slower
    # when the cores are shared (measured here: 488 ms against 1 ms per inference); set before
    # torch loads, for this process and the runtimes' children, unless the user chose
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    debug = "--debug" in args or bool(os.environ.get("MTCONVERT_DEBUG"))
    try:
        code = cli.main(args=args, prog_name="mtconvert", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        _fail(f"mtconvert: error: {exc.format_message()}", debug)
        code = EXIT_USAGE
    except (click.Abort, KeyboardInterrupt):
        click.echo("mtconvert: interrupted", err=True)
        code = 130
    except MtConvertError as exc:
        _fail(f"mtconvert: error: {exc}", debug)
        code = exc.exit_code
    except Exception:  # a bug: show it, and ask for a report
        import traceback

        traceback.print_exc()
        click.echo("mtconvert: internal error; please report it with the traceback above",
                   err=True)
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else 0)


def _fail(line: str, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    click.echo(line.splitlines()[0] if line else line, err=True)
