"""Running third-party tools as untrusted neighbours: the one child-process protocol.

Converters crash, hang, call sys.exit and print a lot. A backend runs them in a child process
(``run_tool`` for a binary; ``run_job`` for Python code: the job is a JSON file, the child prints
its result as one ``MTCONVERT-RESULT {json}`` line), with a time-out and a log, and checks the
files it expects (``expect_files``): exit 0 proves nothing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from mtconvert.errors import ConversionError


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Failure))\b:?\s*(.*)$")


_GENERIC = ("Exception encountered when calling layer", "in user code:")


def error_summary(output: str, limit: int = 300) -> str:
    """The most telling line of a tool's output: the last ``SomethingError: message`` (with the
    next detail line when the message is generic), else the last non-empty line."""
    lines = [ln.strip() for ln in output.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        m = _ERROR_LINE.match(lines[i])
        if not m or lines[i].startswith(("File ", "raise ")):
            continue
        text = f"{m.group(1)}: {m.group(2)}".strip()
        if any(g in m.group(2) for g in _GENERIC) or not m.group(2):
            detail = next((ln for ln in lines[i + 1:] if ln), "")
            text = f"{text} {detail}".strip()
        return text[:limit]
    rest = [ln for ln in lines if ln]
    return rest[-1][:limit] if rest else ""


def run_tool(cmd: list[str], *, target: str, step: str, log_path: Path,
             timeout_s: float | None = None, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> str:
    """Run a converter in a child process, log its output to ``log_path``, return that output.

    A non-zero exit, a signal or a time-out raises ConversionError naming the step and the log.
    Callers must still check the files they expect: exit 0 proves nothing.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = _decode(exc.stdout) + _decode(exc.stderr)
        _append_log(log_path, cmd, out)
        raise ConversionError(f"timed out after {timeout_s:g} s", target=target, step=step,
                              log_path=log_path, stderr_tail=tail(out)) from None
    out = proc.stdout + proc.stderr
    _append_log(log_path, cmd, out)
    if proc.returncode != 0:
        why = (f"killed by {_signal_name(proc.returncode)}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        last = error_summary(out)
        raise ConversionError(f"{why}: {last}" if last else why, target=target, step=step,
                              log_path=log_path, stderr_tail=tail(out))
    return out


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def _append_log(log_path: Path, cmd: list[str], output: str) -> None:
    with log_path.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{output}\n")


RESULT_PREFIX = "MTCONVERT-RESULT "


def tool_result(output: str, *, target: str, step: str, log_path: Path | None) -> dict[str, Any]:
    """The JSON a child tool printed on its last ``MTCONVERT-RESULT {json}`` line."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ConversionError("converter printed no result", target=target, step=step,
                          log_path=log_path)


def run_job(module: str, job: dict[str, Any], job_path: Path, *, target: str, step: str,
            log_path: Path, timeout_s: float | None,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``job`` as JSON, run ``python -m module JOB`` as an untrusted tool and return the
    result it printed."""
    job_path.write_text(json.dumps(job))
    out = run_tool(python_cmd("-m", module, str(job_path)), target=target, step=step,
                   log_path=log_path, timeout_s=timeout_s, env=env)
    return tool_result(out, target=target, step=step, log_path=log_path)


def python_cmd(*args: str) -> list[str]:
    """A command line that runs this interpreter (the tools are installed beside mtconvert)."""
    return [sys.executable, *args]


def expect_files(paths: list[Path], *, target: str, step: str, log_path: Path | None) -> None:
    """A tool that exits 0 without its output files has failed."""
    missing = [p.name for p in paths if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise ConversionError(f"tool exited 0 but did not write {', '.join(missing)}",
                              target=target, step=step, log_path=log_path)


def child_main(handler: Any) -> None:
    """The child's side of ``run_job``: read the job file named on the command line, call
    ``handler(job)`` and print its JSON result on the ``MTCONVERT-RESULT`` line."""
    job = json.loads(Path(sys.argv[1]).read_text())
    print(RESULT_PREFIX + json.dumps(handler(job)), flush=True)
