"""Errors a user can fix. The command line prints them as one line each and exits non-zero, with no traceback."""

from __future__ import annotations

from typing import Iterable


class UserError(Exception):
    """A problem in the spec, the data or the environment that the user must fix (not a bug)."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def lines(self) -> list[str]:
        return [str(self)]


class UserErrors(UserError):
    """Several problems found at once (for example one per broken spec rule)."""

    def __init__(self, messages: Iterable[str]):
        self.messages = list(messages)
        super().__init__("; ".join(self.messages))

    def lines(self) -> list[str]:
        return list(self.messages)


EXIT_USER_ERROR = 2
EXIT_CRASH = 1


# ------------------------------------------------------------------------------------- error lines
# What a failed pod shows: the kubelet copies the container's termination-message file into the pod's
# status (`kubectl describe pod`, and the operator's Failed condition), so the `error:` lines a command printed
# survive the pod's deletion. Several ranks of one node print the same problem: each distinct line is printed
# once per torchrun run (the first rank to claim it prints it), and always in one write, so lines of two ranks
# never run together.

import hashlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

TERMINATION_LOG_ENV = "QWEN_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_LIMIT = 4096  # what the kubelet keeps of the file


def _launcher_key(run_id: str) -> str:
    """What the ranks of one torchrun launch on this host share: the run id (torchrun's default, without a
    rendezvous id, is the same "none" for every launch), the agent process that started them (their parent) and
    that process's start time, so a later launch, even one given a recycled PID, never matches."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = ""
    return f"{run_id}:{ppid}:{started}"


def _claim(line: str, run_id: str) -> bool:
    """True for the first process of this torchrun launch to print `line` on this host."""
    digest = hashlib.sha256(f"{_launcher_key(run_id)}\0{line}".encode()).hexdigest()[:24]
    marker = os.path.join(tempfile.gettempdir(), f"qwen-error-{digest}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True  # no shared scratch space: print it (a duplicate beats a lost error)


class ErrorLines:
    """A stderr stand-in: whole lines go out in one write; `error:` lines are deduplicated across the ranks of one
    torchrun run and remembered for the termination message."""

    def __init__(self, stream, run_id: str | None = None):
        self.stream = stream
        self.run_id = run_id
        self.lines: list[str] = []
        self._partial = ""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name):  # encoding, errors, buffer, ... of the real stream
        return getattr(self.stream, name)

    def write(self, text: str) -> int:
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.startswith("error: "):
                if line in self.lines:
                    continue
                self.lines.append(line)
                if self.run_id and not _claim(line, self.run_id):
                    continue
            out.append(line + "\n")
        if out:
            self.stream.write("".join(out))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self._partial and not self._partial.startswith("error: "):
            self.stream.write(self._partial)
            self._partial = ""
        self.stream.flush()

    def close(self) -> None:  # the real stderr stays open
        self.flush()


def termination_message(errors: list[str]) -> str:
    """The pod's termination message: the error lines, most important first, within the kubelet's limit."""
    text = "\n".join(e.removeprefix("error: ") for e in errors)
    return text if len(text) <= TERMINATION_LOG_LIMIT else text[: TERMINATION_LOG_LIMIT - 3] + "..."


def write_termination_log(errors: list[str], path: str | None = None) -> bool:
    """Write the error lines where the kubelet reads the termination message; only inside a container (the file
    exists there), or where QWEN_TERMINATION_LOG names a file. Never fails the command."""
    path = path or os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG
    if not errors or (path == DEFAULT_TERMINATION_LOG and not os.path.exists(path)):
        return False
    try:
        with open(path, "w") as f:
            f.write(termination_message(errors))
        return True
    except OSError:
        return False


def install_error_lines() -> ErrorLines:
    """Route sys.stderr through a new ErrorLines (the caller puts `.stream` back when done)."""
    wrapper = ErrorLines(sys.stderr, os.environ.get("TORCHELASTIC_RUN_ID"))
    sys.stderr = wrapper
    return wrapper
