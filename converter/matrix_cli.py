"""What ``mtconvert matrix ZOO.toml`` does once click has parsed it (the command itself is
declared in converter/cli.py from ``matrix_spec.CLI_OPTIONS`` and the renderers' options):
read the matrix file, run the cells with progress, write the report files, render the console
grid, return the exit code."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from mtconvert import matrix_spec, render
from mtconvert.run import matrix as mode


def main(matrix_file: Path, values: dict[str, Any], stdout: IO[str] | None) -> int:
    """``values``: every parsed CLI value; ``stdout`` the real stdout under --json (else None)."""
    names = {o.name for o in matrix_spec.CLI_OPTIONS}
    given = {k: v for k, v in values.items() if k in names and v is not None}
    files = {o.name: values.get(o.name) for o in render.options("matrix")}
    mopts = mode.MatrixOptions(
        out_dir=Path(given.get("out_dir", "build/matrix")),
        executor=given.get("executor", "local"), jobs=given.get("jobs"),
        resume=bool(given.get("resume")), cell_timeout=given.get("cell_timeout"),
        ray_address=given.get("ray_address"),
        cpus_per_cell=float(given.get("cpus_per_cell", 1.0)),
        memory_per_cell=matrix_spec.parse_bytes(given.get("memory_per_cell")))
    spec = matrix_spec.load(matrix_file, mopts.out_dir.resolve(), defaults=_config(values),
                            raw=bool(given.get("raw")))
    mopts = mode.MatrixOptions(**{**mopts.__dict__, "out_dir": mopts.out_dir.resolve()})
    quiet, verbose = values.get("quiet"), values.get("verbose")
    if quiet:
        report = mode.run(spec, mopts)
    elif sys.stderr.isatty() and not verbose:
        with mode.RichProgress(len(spec.cells)) as bar:
            report = mode.run(spec, mopts, progress=bar)
    else:
        report = mode.run(spec, mopts, progress=mode.line_progress(sys.stderr))
    render.write_files(report, files)
    if stdout is None:
        render.render("console", report, sys.stdout)
    else:  # --json: the grid to stderr (not with -q), the JSON on the real stdout
        if not quiet:
            render.render("console", report, sys.stderr)
        render.render("json", report, stdout)
        stdout.flush()
    return report.exit_code


# decided by the matrix for each cell, so a config file's value is not used
_PER_CELL = {"targets", "precision", "out_dir", "jobs"}


def _config(values: dict[str, Any]) -> dict[str, Any]:
    """Run options of the config file (--config, or mtconvert.toml / [tool.mtconvert] in the
    current folder), beneath the matrix file's own; report files and what the matrix decides
    per cell left out."""
    from mtconvert import config
    from mtconvert.registry import default_registry

    path = values.get("config") or config.find(Path.cwd())
    if not path:
        return {}
    files = {o.name for o in render.options("convert")}
    return {k: v for k, v in config.load(path, "convert", default_registry()).items()
            if k not in _PER_CELL | files}
