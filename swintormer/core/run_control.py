"""How a run starts, stops early and leaves its folder, the same for every long job.

Shared clusters stop jobs at any moment: pre-emption (SIGTERM, then SIGKILL a little later),
time limits (SLURM sends ``--signal`` first, by default SIGUSR1 where asked), requeued job arrays.
This module holds what the training engine and the prior-cache job need for that:

- :func:`stop_signals`: SIGTERM, SIGINT and SIGUSR1 become a *request* to stop at the next safe
  point (after the optimizer step, or after the cache entry in progress), which the job then
  answers with a checkpoint and :data:`EXIT_STOPPED`. A second SIGINT more than
  :data:`SECOND_SIGINT_AFTER_S` after the first aborts at once (``KeyboardInterrupt``). Repeated
  SIGTERM/SIGUSR1 change nothing, and neither does a SIGINT within that second: launchers
  (torchrun, ``accelerate launch``) pass a terminal's Ctrl-C on to their processes, which then
  receive it twice.
- :func:`parse_duration` for ``--time-limit`` (``3h50m``, ``90m``, ``45s``, ``5400``) and
  :func:`seconds_since_process_start`, the clock a time limit is counted on.
- :class:`RunFolderLock`, which keeps a second job out of a folder one is writing, and
  :func:`answer_from_main_process`, by which the main process alone takes such a lock or checks
  a folder and every process learns the outcome;
- :func:`prepare_run_folder`: the rules that keep two runs out of one folder (see its docstring),
  :func:`cut_metrics_log` and :func:`write_status` (``RUN_DIR/status.json``, which tells a job
  script whether the run finished, stopped early or failed, also when a launcher replaces the
  process's exit code by its own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from swintormer.core.config import ConfigError
from swintormer.core.files import TEMPORARY_SUFFIX, atomic_write_text, remove_stale_temporaries

__all__ = [
    "EXIT_STOPPED",
    "EXIT_ABORTED",
    "RUN_OUTPUTS",
    "STATUS_FILE",
    "StopSignals",
    "stop_signals",
    "exit_code_of_finished_job",
    "parse_duration",
    "seconds_since_process_start",
    "RunFolderError",
    "RunFolderLock",
    "answer_from_main_process",
    "check_max_steps",
    "prepare_run_folder",
    "cut_metrics_log",
    "write_status",
]

#: Exit code of a job that stopped early on request (signal or ``--time-limit``) after saving
#: its state: EX_TEMPFAIL of BSD's sysexits.h ("try again later"); a job script requeues on it.
EXIT_STOPPED = 75
#: Exit code of a run aborted by a second SIGINT (128 + SIGINT, the shell's convention).
EXIT_ABORTED = 130
#: A SIGINT this soon after the first stop request is the same request passed on by a launcher.
SECOND_SIGINT_AFTER_S = 1.0

#: What a training run writes into its folder; ``--overwrite`` deletes these and nothing else.
RUN_OUTPUTS = ("checkpoints", "logs", "validation", "model", "debug", "config.yaml", "status.json")
STATUS_FILE = "status.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
#: The lock file of a folder a job is writing (:class:`RunFolderLock`); no output of the run.
LOCK_FILE = ".lock"


# --------------------------------------------------------------------------- signals


def _stop_signal_numbers() -> list[int]:
    names = ("SIGTERM", "SIGINT", "SIGUSR1")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


class StopSignals:
    """The stop requests received while installed (see the module docstring).

    ``requested`` is the number of the first stop signal (None before any), ``name`` its name.
    A job may also :meth:`request` a stop itself (other processes' signals, in a group).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> int | None:
        return self.received

    @property
    def name(self) -> str | None:
        return signal_name(self.received) if self.received is not None else None

    def request(self, signum: int) -> None:
        if self.received is None:
            self.received = signum
            self._first_at = time.monotonic()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.request(signum)
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > SECOND_SIGINT_AFTER_S:
            raise KeyboardInterrupt(f"second SIGINT after {self.name}: aborted")

    def install(self) -> None:
        """Catch the stop signals, except those this process was started ignoring (a shell's
        background job ignores SIGINT; ``nohup`` ignores SIGHUP): they stay ignored."""
        for signum in _stop_signal_numbers():
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


_ACTIVE: list[StopSignals] = []


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Catch the stop signals for the duration of the block; nested blocks share one catcher, so
    a pipeline can catch them from its start and the engine sees what came during set-up. Off
    the main thread (where Python cannot install handlers) the catcher only takes :meth:`request`."""
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    catcher = StopSignals()
    if threading.current_thread() is threading.main_thread():
        catcher.install()
    _ACTIVE.append(catcher)
    try:
        yield catcher
    finally:
        _ACTIVE.pop()
        catcher.restore()


def exit_code_of_finished_job(code: int) -> int:
    """Ignore the stop signals from now on and return ``code``: for a command's last line,
    ``sys.exit(exit_code_of_finished_job(main()))``. The job's work is saved when ``main``
    returns; a signal during the interpreter's shutdown must not turn its exit code into a kill."""
    for signum in _stop_signal_numbers():
        signal.signal(signum, signal.SIG_IGN)
    return code


# --------------------------------------------------------------------------- time


_DURATION = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in ``3h50m``, ``90m``, ``1h``, ``45s``, ``1h0m30s`` or a plain number of seconds."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.match(value)
        if not value or match is None or not any(match.groupdict().values()):
            raise ValueError(f"{text!r} is not a duration (examples: 3h50m, 90m, 45s, 5400)") from None
        parts = {key: float(number) if number else 0.0 for key, number in match.groupdict().items()}
        seconds = 3600 * parts["h"] + 60 * parts["m"] + parts["s"]
    if not seconds > 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return seconds


_IMPORTED_AT = time.monotonic()


def seconds_since_process_start() -> float:
    """Seconds since this process started (Linux: from ``/proc``, so the interpreter's and
    torch's import time count); elsewhere since this module was imported."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / ticks)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


# --------------------------------------------------------------------------- run folders


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked; the message says why and what to pass."""


class RunFolderLock:
    """An exclusive lock on a job's folder, held from before the folder is checked until the job ends.

    Two jobs started on one folder (a job script run twice, a requeued job whose previous
    instance still runs) would otherwise both pass the run-folder rules and write into each
    other's checkpoints. The lock is ``flock`` on ``FOLDER/.lock``: the kernel drops it when
    the process ends however it ends (SIGKILL included), so a killed job never leaves a stale
    lock, and the file itself, which records the holder's pid and host, stays harmlessly. On a
    system without ``fcntl`` (Windows) nothing is locked. Use as a context manager or with
    :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._handle: Any = None

    def acquire(self) -> "RunFolderLock":
        """Take the lock, creating the folder; raise :class:`RunFolderError` naming the holder when taken."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"{self.folder} is a file, not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(f"{self.what} {self.folder} is in use by {holder}: wait for that job to end "
                                 "(or stop it), or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


T = TypeVar("T")


def answer_from_main_process(state: Any, action: Callable[[], T],
                             catch: tuple[type[Exception], ...]) -> tuple[T | None, str | None]:
    """Run ``action`` on the main process only and give every process its outcome.

    ``state`` is an ``accelerate`` ``Accelerator`` or ``PartialState``. Returns ``(result,
    None)``, or ``(None, message)`` when ``action`` raised one of ``catch``. Taking a folder's
    lock and checking its contents must happen once, but every process must learn the answer:
    a process that went on alone while the main process stopped would wait for it forever. The
    result must be picklable (it is broadcast).
    """
    answer: list[tuple[T | None, str | None]] = [(None, None)]
    if state.is_main_process:
        try:
            answer = [(action(), None)]
        except catch as exc:
            answer = [(None, str(exc))]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    return answer[0]


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / CHECKPOINT_DIR
    return sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())


def _is_run_output(name: str) -> bool:
    """One of :data:`RUN_OUTPUTS`, or the temporary a killed atomic write of one left."""
    if name in RUN_OUTPUTS:
        return True
    return name.endswith(TEMPORARY_SUFFIX) and any(name.startswith(f".{output}.") for output in RUN_OUTPUTS)


def _remove_run_outputs(output_dir: Path) -> list[str]:
    removed = []
    for entry in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if _is_run_output(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
    return removed


def _checkpoint_max_steps(checkpoint: Path) -> int | None:
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    return state.get("max_steps")


def check_max_steps(checkpoint: Path, max_steps: int) -> None:
    """Refuse to resume ``checkpoint`` with another run length: ``train.max_steps`` sets the
    learning-rate schedule, so continuing with another value is not the run that was started."""
    recorded = _checkpoint_max_steps(checkpoint)
    if recorded is not None and recorded != max_steps:
        raise RunFolderError(
            f"{checkpoint} belongs to a run of train.max_steps={recorded}, this one asks for {max_steps}: "
            f"train.max_steps sets the schedule, so resume with --max-steps {recorded} (or the config it "
            "was made with) and stop early with --stop-after-steps or --time-limit")


def prepare_run_folder(output_dir: str | os.PathLike[str], resume: str | None, overwrite: bool,
                       max_steps: int) -> tuple[Path | None, list[str]]:
    """Apply the run-folder rules and return (checkpoint to resume or None, lines to print).

    - no ``resume``: the folder must be empty or absent (a used one is refused, naming
      ``--resume auto`` and ``--overwrite``);
    - ``overwrite``: delete the run outputs (:data:`RUN_OUTPUTS`) first; other files stay;
    - ``resume="auto"``: the newest complete checkpoint, or a fresh start when there is none; a
      folder without checkpoint may hold only what a run stopped before its first checkpoint
      left (deleted then), so that ``auto`` never writes into an unrelated folder;
    - ``resume="latest"``: the newest complete checkpoint, which must exist;
    - ``resume=PATH``: that checkpoint; from another folder only into an empty one; from this
      folder, the checkpoints after it are deleted (they belong to the continuation this resume
      replaces, and a later ``--resume auto`` would otherwise pick them).

    A checkpoint made for another ``max_steps`` is refused (:func:`check_max_steps`) before
    anything is deleted. Temporaries of killed atomic writes are removed. Raises
    :class:`RunFolderError` (a ``ConfigError``) with a one-line message.
    """
    output_dir = Path(output_dir)
    entries = sorted(entry for entry in output_dir.iterdir() if entry.name != LOCK_FILE) if output_dir.is_dir() else []
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"--output {output_dir} is a file, not a folder")
    lines: list[str] = []
    checkpoint: Path | None = None
    if overwrite:
        if resume is not None:
            raise RunFolderError("--overwrite starts a new run and --resume continues one: pass only one")
        removed = _remove_run_outputs(output_dir)
        if removed:
            kept = len(entries) - len(removed)
            lines.append(f"--overwrite: deleted {', '.join(removed)} from {output_dir}"
                         + (f" (kept {kept} other entries)" if kept else ""))
    elif resume is None:
        if entries:
            names = ", ".join(entry.name for entry in entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise RunFolderError(f"run folder {output_dir} is not empty ({names}): pass --resume auto to continue "
                                 "the run in it, or --overwrite to delete that run and start over")
    elif resume in ("auto", "latest"):
        complete = _complete_checkpoints(output_dir)
        if complete:
            checkpoint = complete[-1]
        elif resume == "latest":
            raise RunFolderError(f"--resume latest: no complete checkpoint in {output_dir / CHECKPOINT_DIR} "
                                 "(--resume auto starts a new run when there is none)")
        else:
            foreign = [entry.name for entry in entries if not _is_run_output(entry.name)]
            if foreign:
                raise RunFolderError(f"--resume auto: {output_dir} has no checkpoint and holds files no run "
                                     f"writes ({', '.join(foreign[:4])}); use an empty folder")
            removed = _remove_run_outputs(output_dir)
            if removed:
                lines.append(f"--resume auto: no checkpoint yet; deleted what the stopped run left ({', '.join(removed)})")
    else:
        checkpoint = Path(resume)
        if not (checkpoint / STATE_FILE).is_file():
            raise RunFolderError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
        own = checkpoint.resolve().parent == (output_dir / CHECKPOINT_DIR).resolve()
        if not own and entries:
            raise RunFolderError(f"--resume {resume} continues another folder's run: --output {output_dir} must be "
                                 "empty (or pass --resume auto to continue the run already in it)")
    if checkpoint is not None:
        check_max_steps(checkpoint, max_steps)
        if resume not in ("auto", "latest"):
            later = [p for p in _complete_checkpoints(output_dir) if p.name > checkpoint.name]
            for path in later:
                shutil.rmtree(path)
            if later:
                lines.append(f"--resume {resume}: deleted the later checkpoints {', '.join(p.name for p in later)}")
    for folder in (output_dir, output_dir / CHECKPOINT_DIR, output_dir / "logs", output_dir / "validation"):
        remove_stale_temporaries(folder)
    return checkpoint, lines


def cut_metrics_log(path: str | os.PathLike[str], step: int) -> int:
    """Keep the lines of a JSON-lines metrics log whose ``step`` is at most ``step`` (and drop a
    line a kill cut short), atomically; returns the number of lines removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            removed += 1
    if removed:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return removed


def write_status(output_dir: str | os.PathLike[str], state: str, **fields: Any) -> None:
    """Write ``RUN_DIR/status.json`` atomically: ``{"state": running|finished|stopped|failed, ...}``."""
    record = {"state": state, **fields, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(Path(output_dir) / STATUS_FILE, json.dumps(record, indent=1) + "\n")
