"""The ``mtconvert`` command. Start-up imports click only: rich, numpy and every toolchain load
when a command needs them (a test proves it).

    mtconvert MODEL --to tflite,onnx-mobile     same as: mtconvert convert MODEL --to ...
    mtconvert backends
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from mtconvert import __version__
from mtconvert.errors import EXIT_INTERNAL, EXIT_USAGE, MtConvertError, UsageError

PRECISION_CHOICES = ("fp32", "fp16", "int8")
# mtconvert.backends.coreml.backend.DEPLOYMENT_TARGETS (not imported: start-up stays light)
COREML_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15")


class DefaultGroup(click.Group):
    """A group whose first argument, when it is no command, is the model for ``convert``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtconvert")
def cli() -> None:
    """Convert a PyTorch or ONNX Transformer to mobile targets and prove each artifact right.

    \b
    mtconvert MODEL --to onnx-mobile,tflite [--out DIR] [--report-json PATH]
    mtconvert validate SOURCE ARTIFACT...
    mtconvert verify BUNDLE_DIR
    mtconvert backends

    Exit codes: 0 every target passed, 1 a check failed, 2 usage error or unreadable model,
    3 a backend failed to convert or run, 4 internal error.
    """


def _split_targets(_ctx: Any, _param: Any, value: tuple[str, ...]) -> tuple[str, ...] | None:
    tokens = [t.strip() for v in value for t in v.split(",") if t.strip()]
    if value and not tokens:
        raise click.BadParameter("give at least one target name")
    return tuple(tokens) or None


_SHARED = [
    click.option("--report-json", type=click.Path(path_type=Path),
                 help="Write the JSON report here."),
    click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="fp32",
                 show_default=True, help="Artifact precision; picks the tolerance profile."),
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x128",
                 help="Fix an input's shape (repeatable). Named dynamic axes follow to other "
                      "inputs."),
    click.option("--inputs", type=click.Path(path_type=Path),
                 help="Validation inputs (.npz by name)."),
    click.option("--threads", type=int, default=None,
                 help="Threads for reference and targets."),
    click.option("--warmup", type=int, default=3, show_default=True),
    click.option("--iterations", type=int, default=20, show_default=True, help="Timed runs."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seed of generated inputs."),
    click.option("--atol", multiple=True, metavar="[OUTPUT:]VALUE", help="Absolute tolerance."),
    click.option("--rtol", multiple=True, metavar="[OUTPUT:]VALUE", help="Relative tolerance."),
    click.option("--min-cosine", multiple=True, metavar="[OUTPUT:]VALUE",
                 help="Minimum cosine similarity."),
    click.option("--min-snr-db", multiple=True, metavar="[OUTPUT:]VALUE",
                 help="Minimum signal-to-noise ratio in dB (fp32 default 100: relative L2 "
                      "error 1e-5)."),
    click.option("--timeout", type=float, default=900.0, show_default=True,
                 help="Seconds allowed per conversion step and per validation run."),
    click.option("--allow-flex", is_flag=True,
                 help="tflite: accept Select-TF (Flex) ops instead of failing the target."),
    click.option("--trust-pickle", is_flag=True,
                 help="Load pickle-based models (.pt/.pth TorchScript or torch.save, pickled "
                      ".pt2 payloads); loading a pickle can run arbitrary code."),
    click.option("--max-model-bytes", type=int, default=None, help="Refuse larger model files."),
    click.option("--quiet", "-q", is_flag=True, help="No progress lines, only the report."),
    click.option("--verbose", "-v", is_flag=True,
                 help="Progress lines on stderr even when it is not a terminal."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
]


def shared_options(f: Any) -> Any:
    for option in reversed(_SHARED):
        f = option(f)
    return f


@cli.command("convert")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--to", "targets", multiple=True, callback=_split_targets,
              help="Targets, comma separated (default: every available target).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("build"),
              show_default=True, help="Folder for the artifacts.")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="int8 calibration inputs (.npz by name; samples stacked on a first axis).")
@click.option("--int8-scheme", type=click.Choice(("dynamic", "full")), default=None,
              help="tflite int8: dynamic-range (default) or full-integer (calibrated).")
@click.option("--jobs", "-j", type=int, default=None,
              help="Targets converting at once (default: number of cores).")
@click.option("--no-cache", is_flag=True, help="Convert again even when a cached conversion fits.")
@click.option("--seq-lens", default=None, metavar="8,64,128",
              help="Also validate at these sequence lengths (dynamic axis 1).")
@click.option("--batch-sizes", default=None, metavar="1,4",
              help="Also validate at these batch sizes (dynamic axis 0).")
@click.option("--localize", is_flag=True,
              help="Name the first diverging operator even when numerics pass (bisection).")
@click.option("--keep-intermediate", is_flag=True,
              help="ncnn: also keep pnnx's intermediate files (in <model>.ncnn-intermediate/).")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Write a golden bundle per target here (artifact, inputs, reference outputs, "
                   "tolerances, tool versions) for `mtconvert verify`.")
@click.option("--coreml-target", type=click.Choice(COREML_TARGETS), default=None,
              help="coreml: minimum deployment target (default iOS16).")
@click.option("--palettize", type=click.Choice(("1", "2", "3", "4", "6", "8")), default=None,
              metavar="BITS", help="coreml: palettize the weights to 2^BITS k-means clusters.")
@shared_options
def convert_cmd(model: Path, targets: tuple[str, ...] | None, out_dir: Path,
                calibration: Path | None, int8_scheme: str | None, jobs: int | None,
                no_cache: bool, seq_lens: str | None, batch_sizes: str | None,
                localize: bool, keep_intermediate: bool, bundle_dir: Path | None,
                coreml_target: str | None, palettize: str | None, **shared: Any) -> int:
    """Convert MODEL (.onnx or .pt2) to each target and validate every artifact."""
    from mtconvert import api

    options = _options(shared) | dict(calibration=calibration, jobs=jobs, cache=not no_cache,
                                      seq_lens=_ints("--seq-lens", seq_lens),
                                      batch_sizes=_ints("--batch-sizes", batch_sizes),
                                      localize=localize)
    if int8_scheme:
        options["extra"]["int8_scheme"] = int8_scheme
    if keep_intermediate:
        options["extra"]["keep_intermediate"] = True
    if bundle_dir:
        options["extra"]["bundle"] = str(bundle_dir)
    if coreml_target:
        options["extra"]["coreml_target"] = coreml_target
    if palettize:
        options["extra"]["palettize"] = int(palettize)
    report = api.convert(model, targets, out_dir, None, progress=_progress(shared), **options)
    return _finish(report, shared["report_json"])


@cli.command("validate")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@shared_options
def validate_cmd(source: Path, artifacts: tuple[Path, ...], **shared: Any) -> int:
    """Check ARTIFACTS built elsewhere (.tflite, .ort, .onnx, .mlpackage) against SOURCE,
    without converting: the release gate. Same checks, report and exit codes as a conversion."""
    from mtconvert import api

    report = api.validate(source, list(artifacts), progress=_progress(shared), **_options(shared))
    return _finish(report, shared["report_json"])


@cli.command("verify")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=None, help="Threads for the runtime.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--iterations", type=int, default=20, show_default=True, help="Timed runs.")
@click.option("--timeout", type=float, default=900.0, show_default=True,
              help="Seconds allowed per validation run.")
@click.option("--report-json", type=click.Path(path_type=Path),
              help="Write the JSON report here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines, only the report.")
@click.option("--verbose", "-v", is_flag=True, help="Progress lines on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify_cmd(bundle_dir: Path, threads: int | None, warmup: int, iterations: int,
               timeout: float, **shared: Any) -> int:
    """Re-check the artifacts of golden bundles (written by --bundle) against their stored
    inputs, reference outputs and tolerances, e.g. on a macOS CI worker. No source needed."""
    from mtconvert import api

    report = api.verify(bundle_dir, threads=threads, warmup=warmup, iterations=iterations,
                        timeout=timeout, progress=_progress(shared))
    return _finish(report, shared["report_json"])


def _ints(flag: str, text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, not {text!r}") from None


def _options(shared: dict[str, Any]) -> dict[str, Any]:
    from mtconvert.shapes import parse_shape_spec

    return dict(
        precision=shared["precision"],
        input_shapes=dict(parse_shape_spec(s) for s in shared["input_shapes"]),
        inputs=shared["inputs"], threads=shared["threads"], warmup=shared["warmup"],
        iterations=shared["iterations"], seed=shared["seed"],
        atol=_tolerance("--atol", shared["atol"]), rtol=_tolerance("--rtol", shared["rtol"]),
        min_cosine=_tolerance("--min-cosine", shared["min_cosine"]),
        min_snr_db=_tolerance("--min-snr-db", shared["min_snr_db"]), timeout=shared["timeout"],
        extra={"allow_flex": True} if shared["allow_flex"] else {},
        trust_pickle=shared["trust_pickle"], max_model_bytes=shared["max_model_bytes"])


def _progress(shared: dict[str, Any]) -> Any:
    show = not shared["quiet"] and (shared["verbose"] or sys.stderr.isatty())
    if not show:
        return None
    console = _console(stderr=True)
    return lambda msg: console.print(f"[dim]· {msg}[/]")


def _finish(report: Any, report_json: Path | None) -> int:
    if report_json is not None:
        _write_atomic(report_json, report.to_json())
    from mtconvert.render.console import render

    render(report, _console(stderr=False))
    return report.exit_code


def _tolerance(flag: str, values: tuple[str, ...]) -> Any:
    """``1e-3`` -> global value; ``logits:1e-3`` -> that output. Returns float, dict or None."""
    glob: str | None = None
    per: dict[str, str] = {}
    for v in values:
        out, sep, num = v.rpartition(":")
        if sep:
            per[out] = num
        else:
            glob = num
    for num in [glob, *per.values()]:
        if num is not None:
            try:
                float(num)
            except ValueError:
                raise UsageError(f"{flag} {num!r} is not a number") from None
    if per and glob is not None:
        raise UsageError(f"{flag}: give either one global value or OUTPUT:VALUE pairs, not both")
    return per or glob


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
