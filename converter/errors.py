"""Errors users can act on. Each carries the exit code the CLI returns for it.

Exit codes: 0 passed, 1 a check failed, 2 usage or unreadable model, 3 a backend failed to
convert or run, 4 internal error. A numerical mismatch is a result, never an exception.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EXIT_PASSED = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3
EXIT_INTERNAL = 4


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line (its type's name when it has no text), at most ``limit``
    characters: what a one-line error quotes of a tool's exception."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


class MtConvertError(Exception):
    """Root of every error mtconvert raises on purpose."""

    exit_code = EXIT_INTERNAL


class UsageError(MtConvertError):
    """The command line or API call is malformed (bad option value, bad shape spec...)."""

    exit_code = EXIT_USAGE


class ModelLoadError(MtConvertError):
    """The source model is missing, unreadable or invalid."""

    exit_code = EXIT_USAGE


class InputGenerationError(UsageError):
    """Validation inputs can be neither generated nor read from the user's file."""


class UnknownTargetError(UsageError):
    def __init__(self, token: str, known: Iterable[str]):
        self.token = token
        self.known = sorted(known)
        super().__init__(f"unknown target {token!r}; known targets: {', '.join(self.known) or 'none'}")


class BackendUnavailableError(MtConvertError):
    """A backend's dependencies are missing; the message holds the pip command."""

    exit_code = EXIT_BACKEND

    def __init__(self, target: str, missing: Iterable[str], extra: str):
        self.target = target
        self.missing = sorted(missing)
        self.install_hint = f"pip install 'mtconvert[{extra}]'"
        super().__init__(
            f"target {target!r} needs {', '.join(self.missing)}: {self.install_hint}"
        )


class StepError(MtConvertError):
    """A backend step failed. Carries target, step, log path and the tail of the tool's stderr."""

    exit_code = EXIT_BACKEND

    def __init__(self, message: str, *, target: str = "", step: str = "",
                 log_path: Path | None = None, stderr_tail: str = ""):
        self.target = target
        self.step = step
        self.log_path = log_path
        self.stderr_tail = stderr_tail
        super().__init__(message)

    @property
    def reason(self) -> str:
        """What failed, without the target's name or the log's path (reports hold those)."""
        return f"{self.step}: {self.args[0]}" if self.step else str(self.args[0])

    def __str__(self) -> str:
        text = f"{self.target}: {self.reason}" if self.target else self.reason
        if self.log_path:
            text += f" (log: {self.log_path})"
        return text


class ConversionError(StepError):
    """A converter failed or produced no usable artifact."""


class RuntimeFailure(StepError):
    """A runtime failed to load or run an artifact (including crashes and time-outs)."""


class RuntimeUnavailable(StepError):
    """No runtime on this machine can run the artifact: its check is skipped, never passed."""
