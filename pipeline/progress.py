"""How a running job shows its progress, and the small file ``python -m pipeline.status`` reads.

kdiga's long loops report :class:`kdiga.progress.Progress` events through a callback. Each
stage gets one, a :class:`JobProgress` made by :func:`pipeline.stages.common.run`
(``args.progress``), which shows them:

- on a terminal (stderr is a TTY): a tqdm bar per task, log lines printed above the bars;
- elsewhere (a log file, a scheduler): a log line at most every ``$KDIGA_PROGRESS_INTERVAL``
  seconds (default 60) with done/total, rate and ETA;
- ``KDIGA_PROGRESS=bar``, ``log`` or ``off`` chooses instead (``log`` when several jobs share
  one terminal, as under ``snakemake --cores 4``);

and keeps ``logs/<stage>/<key>.progress.json`` beside the job's log (:func:`progress_path`)
up to date: written to a temporary file and renamed into place, at most every
:data:`WRITE_EVERY_S` seconds as the job advances, and every ``$KDIGA_HEARTBEAT`` seconds
(default 10) from a background thread whatever the job is doing, so that a reader tells a
running job from one killed without a word: its heartbeat stops.

The file (:data:`FORMAT`)::

    {"format": "kdiga.progress/1", "stage": "distill", "job": "distill-<id>", "pid": 4242,
     "host": "node7", "started": "2026-05-01T10:00:00.000+00:00",
     "heartbeat": "2026-05-01T10:04:10.000+00:00", "heartbeat_s": 10.0,
     "state": "running",              # running, done or failed
     "task": "train", "done": 120, "total": 1400, "unit": "steps",
     "rate": 0.48, "eta_s": 2666.7,   # units per second and seconds left, null if unknown
     "step": "train 120/1400 steps (epoch 9/100, step 8/14)",
     "error": null}                   # failed: the error's type and first line

``task``, ``done``, ``total``, ``rate`` and ``eta_s`` are the job's main task (the first one
it started that is not finished, e.g. an attack's sweep over batches and radii); ``step`` is
the latest event of any task (e.g. the AutoAttack stage inside that sweep): where the job is,
or where it stopped.

Under torchrun only rank 0 reports. A launcher that runs the same job command as torchrun
workers (:mod:`pipeline.launch`) leaves the file to its rank-0 worker while that one's
heartbeat is fresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kdiga.files import remove_stale_temporaries, temporary_prefix
from pipeline import dag

if TYPE_CHECKING:
    from kdiga.progress import Progress

log = logging.getLogger("kdiga.pipeline.progress")

FORMAT = "kdiga.progress/1"
MODE_ENV = "KDIGA_PROGRESS"
MODES = ("auto", "bar", "log", "off")
INTERVAL_ENV = "KDIGA_PROGRESS_INTERVAL"
INTERVAL_S = 60.0  # between two log lines
HEARTBEAT_ENV = "KDIGA_HEARTBEAT"
HEARTBEAT_S = 10.0  # between two heartbeat writes of the progress file
WRITE_EVERY_S = 2.0  # at most one write of the progress file this often as the job advances
STATES = ("running", "done", "failed")
_TASK_FIELDS = ("task", "done", "total", "unit", "rate", "eta_s", "step")


def progress_path(stage: str, key: str | None = None) -> str:
    """The progress file of a job: beside its log (``dag.log_path``)."""
    return str(path_for_log(dag.log_path(stage, key)))


def path_for_log(log_file: str | Path) -> Path:
    """The progress file beside the log ``log_file``: ``<name>.log`` -> ``<name>.progress.json``."""
    return Path(str(log_file).removesuffix(".log") + ".progress.json")


def _job_name(stage: str, log_file: str) -> str:
    """The DVC stage name (``dag.Job.name``) of the job whose log is ``log_file``."""
    path = Path(log_file)
    return f"{stage}-{path.stem}" if path.parent.name == stage else stage


def iso(t: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the millisecond."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def unix(text: str) -> float:
    """The Unix time of an :func:`iso` string."""
    return datetime.fromisoformat(text).timestamp()


def duration(seconds: float | None) -> str:
    """``seconds`` as a person reads it: "42 s", "3 min 05 s", "2 h 07 min", "4 d 03 h"."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if 0 < seconds < 0.5:
        return "<1 s"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def rate_text(rate: float | None, unit: str) -> str:
    """A rate in units per second, minute or hour, whichever reads as at least 1."""
    if not rate:
        return "rate not known yet"
    for per, size in (("s", 1), ("min", 60)):
        if rate * size >= 1:
            return f"{rate * size:.3g} {unit}/{per}"
    return f"{rate * 3600:.3g} {unit}/h"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def read_progress(path: str | Path) -> dict[str, Any] | None:
    """A progress file's contents; None if it is missing or not one."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return None
    return info


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class _Task:
    """One task's latest event, and since when (and from which ``done``) it is timed: its
    first event, or its last restart (``done`` went down or ``total`` changed)."""

    def __init__(self, event: Progress, now: float) -> None:
        self.restart(event, now)

    def restart(self, event: Progress, now: float) -> None:
        self.event, self.since, self.base, self.seen = event, now, event.done, now

    def update(self, event: Progress, now: float) -> None:
        if event.done < self.event.done or event.total != self.event.total:
            self.restart(event, now)
        else:
            self.event, self.seen = event, now

    @property
    def finished(self) -> bool:
        return self.event.done >= self.event.total

    def rate(self) -> float | None:
        """Units per second over this run of the task; None before one unit is done."""
        dt, dd = self.seen - self.since, self.event.done - self.base
        return dd / dt if dt > 0 and dd > 0 else None

    def eta(self, now: float) -> float | None:
        """Seconds left at ``now``, at the task's rate so far."""
        if self.finished:
            return 0.0
        rate = self.rate()
        if rate is None:
            return None
        return max(0.0, (self.event.total - self.event.done) / rate - (now - self.seen))

    def describe(self) -> str:
        e = self.event
        return f"{e.task} {e.done}/{e.total} {e.unit}" + (f" ({e.detail})" if e.detail else "")


class Display(Protocol):
    """Shows a job's progress (:class:`Bars`, :class:`LogLines`)."""

    def update(self, job: JobProgress, task: _Task, now: float) -> None: ...

    def tick(self, job: JobProgress, now: float) -> None: ...

    def close(self) -> None: ...


class LogLines:
    """A log line at most every ``interval`` seconds (the first one ``interval`` seconds after
    the start): the job's main task with done/total, rate and ETA, and where it is."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.time) -> None:
        self.interval, self.last = interval, clock()
        self._lock = threading.Lock()

    def update(self, job: JobProgress, task: _Task, now: float) -> None:
        self.tick(job, now)

    def tick(self, job: JobProgress, now: float) -> None:
        with self._lock:
            if now - self.last < self.interval:
                return
            line = job.line(now, quiet_after=self.interval)
            if line is None:
                return
            self.last = now
        log.info("%s", line)

    def close(self) -> None:
        pass


class Bars:
    """A tqdm bar per task on ``stream`` (a terminal); log lines go above the bars while
    they are shown. A task that starts again resets its bar."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bars: dict[str, tqdm] = {}
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(logging_redirect_tqdm())

    def update(self, job: JobProgress, task: _Task, now: float) -> None:
        e = task.event
        bar = self.bars.get(e.task)
        if bar is None:
            bar = tqdm(
                total=e.total,
                initial=e.done,
                desc=e.task,
                unit=f" {e.unit}",
                position=len(self.bars),
                file=self.stream,
                dynamic_ncols=True,
            )
            self.bars[e.task] = bar
        elif e.done < bar.n or e.total != bar.total:
            bar.reset(total=e.total)
        if e.detail:
            bar.set_postfix_str(e.detail, refresh=False)
        bar.update(e.done - bar.n)

    def tick(self, job: JobProgress, now: float) -> None:
        pass

    def close(self) -> None:
        for bar in reversed(self.bars.values()):
            bar.close()
        self._stack.close()


class JobProgress:
    """The progress of one job: the callback kdiga's loops report to (``job(event)``), its
    display and its progress file.

    Args:
        stage: the job's stage.
        path: its progress file (None: none is kept).
        job: the job's name, as the file records it.
        display: how to show the events (None: not shown).
        heartbeat: seconds between heartbeat writes of the file (:meth:`start`'s thread).
        clock: wall-clock seconds (``time.time``); a test passes a fake one.
        active: False on torchrun ranks > 0: every call does nothing.
    """

    def __init__(
        self,
        stage: str,
        path: str | Path | None,
        *,
        job: str | None = None,
        display: Display | None = None,
        heartbeat: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
        active: bool = True,
    ) -> None:
        self.stage, self.job, self.display, self.active = stage, job or stage, display, active
        self.path = None if path is None else Path(path)
        self.heartbeat, self.clock = float(heartbeat), clock
        self.started = clock()
        self.tasks: dict[str, _Task] = {}
        self.latest: _Task | None = None
        self.state, self.error = "running", None
        self.pid, self.host = os.getpid(), socket.gethostname()
        self._carried: dict[str, Any] = {}
        self._last_write = -math.inf
        self._lock, self._io = threading.Lock(), threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    # -- the callback ---------------------------------------------------------------------

    def __call__(self, event: Progress) -> None:
        if not self.active:
            return
        now = self.clock()
        with self._lock:
            task = self.tasks.get(event.task)
            if task is None:
                task = self.tasks[event.task] = _Task(event, now)
            else:
                task.update(event, now)
            self.latest = task
            due = now - self._last_write >= min(WRITE_EVERY_S, self.heartbeat)
        if self.display is not None:
            self.display.update(self, task, now)
        if due:
            self.write(now)

    def main(self) -> _Task | None:
        """The first task started that is not finished; else the latest one."""
        unfinished = [t for t in self.tasks.values() if not t.finished]
        return unfinished[0] if unfinished else self.latest

    def line(self, now: float, quiet_after: float = math.inf) -> str | None:
        """A log line of where the job stands; None before any event."""
        with self._lock:
            main, latest = self.main(), self.latest
            if main is None or latest is None:
                return None
            e = main.event
            pct = f" ({100 * e.done / e.total:.0f}%)" if e.total else ""
            text = (
                f"{e.task}: {e.done}/{e.total} {e.unit}{pct}, {rate_text(main.rate(), e.unit)}, "
                f"ETA {duration(main.eta(now))}"
            )
            text += f" [{e.detail}]" if e.detail else ""
            if latest is not main:
                text += f"; now {latest.describe()}"
            if now - latest.seen >= quiet_after:
                text += f"; last update {duration(now - latest.seen)} ago"
        return text

    # -- the file -------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """What the progress file holds at ``now``."""
        with self._lock:
            main, latest = self.main(), self.latest
            fields: dict[str, Any] = dict.fromkeys(_TASK_FIELDS)
            fields["step"] = "starting"
            if main is not None:
                e = main.event
                fields |= {"task": e.task, "done": e.done, "total": e.total, "unit": e.unit}
                fields |= {"rate": main.rate(), "eta_s": main.eta(now)}
            if latest is not None:
                fields["step"] = latest.describe()
            if not self.tasks:
                fields |= self._carried
            return {
                "format": FORMAT,
                "stage": self.stage,
                "job": self.job,
                "pid": self.pid,
                "host": self.host,
                "started": iso(self.started),
                "heartbeat": iso(now),
                "heartbeat_s": self.heartbeat,
                "state": self.state,
                **fields,
                "error": self._carried.get("error") or self.error,
            }

    def write(self, now: float | None = None) -> None:
        """Write the progress file now (a temporary file renamed into place). A failure is
        logged once and never stops the job."""
        if self.path is None or not self.active:
            return
        now = self.clock() if now is None else now
        text = json.dumps(self.snapshot(now), indent=1) + "\n"
        # named as kdiga.files names its temporaries, so that those of a killed job go
        tmp = self.path.with_name(temporary_prefix(self.path.name) + "progress.tmp")
        with self._io:
            first, self._last_write = self._last_write == -math.inf, now
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if first:  # what a job killed by SIGKILL left beside the file
                    remove_stale_temporaries(self.path)
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError as err:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot write the progress file %s: %s", self.path, err)

    def _other_writer(self) -> dict[str, Any] | None:
        """The file as another live process of this host keeps it (a torchrun worker of this
        job's launcher), if its heartbeat is fresh; else None."""
        info = read_progress(self.path) if self.path is not None else None
        if not info or info.get("pid") == self.pid or info.get("host") != self.host:
            return None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            fresh = self.clock() - unix(info["heartbeat"]) < 2 * float(info["heartbeat_s"])
            if fresh and info["state"] == "running" and pid_alive(int(info["pid"])):
                return info
        return None

    # -- the job's life -------------------------------------------------------------------

    def start(self) -> JobProgress:
        """Write the file (state running) and start the heartbeat thread."""
        if not self.active:
            return self
        self.write()
        self._thread = threading.Thread(target=self._beat, name="kdiga-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if self._other_writer() is None:
                self.write()
            if self.display is not None:
                self.display.tick(self, self.clock())

    def close(self, error: BaseException | None = None) -> None:
        """The job ended: state done, or failed with ``error``'s first line; the file written
        a last time, the heartbeat stopped and the display closed."""
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.tasks and self.path is not None:  # a launcher: its worker's account stays
            info = read_progress(self.path)
            if info and info.get("pid") != self.pid:
                self._carried = {k: info.get(k) for k in (*_TASK_FIELDS, "error")}
        self.state = "done" if error is None else "failed"
        self.error = None if error is None else _first_line(error)
        self.write()
        if self.display is not None:
            self.display.close()


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        log.warning("%s=%r is not a number of seconds > 0: using %g", env, raw, default)
        return default
    return value


def display_for(stream: TextIO | None = None) -> Display | None:
    """The display ``$KDIGA_PROGRESS`` asks for: auto (default) draws bars when ``stream``
    (stderr) is a terminal and writes log lines otherwise."""
    stream = stream or sys.stderr
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in MODES:
        log.warning("%s=%r is not one of %s: using auto", MODE_ENV, mode, MODES)
        mode = "auto"
    if mode == "off":
        return None
    tty = mode == "auto" and hasattr(stream, "isatty") and stream.isatty()
    if mode == "bar" or tty:
        return Bars(stream)
    return LogLines(_seconds(INTERVAL_ENV, INTERVAL_S))


def start_job(stage: str, log_file: str | None) -> JobProgress:
    """The progress of this process's job of ``stage``, started: its file beside
    ``log_file`` (none without one), shown as ``$KDIGA_PROGRESS`` says. Under torchrun
    (``RANK`` set) only rank 0 reports; the others get an inactive one."""
    if os.environ.get("RANK") not in (None, "0"):
        return JobProgress(stage, None, active=False)
    path = None if log_file is None else path_for_log(log_file)
    name = stage if log_file is None else _job_name(stage, log_file)
    heartbeat = _seconds(HEARTBEAT_ENV, HEARTBEAT_S)
    return JobProgress(stage, path, job=name, display=display_for(), heartbeat=heartbeat).start()
