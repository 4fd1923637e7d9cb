"""Hand-offs between Snakemake and DVC that never bless stale work.

    python -m pipeline.sync              # which jobs are current, and why the others are not
    python -m pipeline.sync --dvc        # record the current jobs in dvc.lock (dvc commit)
    python -m pipeline.sync --snakemake  # adopt the current jobs in Snakemake (--touch)

A job is current when its outputs exist and its provenance record (``pipeline.provenance``)
matches the current params, the current input files and the current code, and every job it
depends on is current too. Only those are handed over: after a targeted run
(``snakemake <one model>``, ``dvc repro <one stage>``) the evaluations and the report made
from the older model stay stale for both tools, and the next run redoes them.

The Snakefile's ``onsuccess`` runs ``--dvc``. ``dvc commit`` rewrites the outputs it records,
which moves their modification times; this command puts the times back, so that Snakemake's
view of what is newer than what does not change.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from kdiga.files import atomic_write_text
from pipeline import dag
from pipeline.params import ParamError, load_params, params_file
from pipeline.provenance import freshness, output_problem


def _mtimes(paths: list[str]) -> dict[Path, tuple[int, int]]:
    """(atime, mtime) in ns of every file under ``paths``."""
    out = {}
    for p in map(Path, paths):
        for f in [p, *p.rglob("*")] if p.is_dir() else [p]:
            if f.exists():
                st = f.stat()
                out[f] = (st.st_atime_ns, st.st_mtime_ns)
    return out


def _commit_once(names: list[str]) -> None:
    """What ``dvc commit --force <names>`` does, with dvc.lock read once and written once,
    whole or not at all.

    DVC's command commits its targets one at a time, and each re-reads dvc.yaml and rewrites
    dvc.lock in place: about 2.5 s a stage, and a process killed while writing leaves a
    partial (or empty) lock. Here the stages are collected once, each is saved (its deps,
    params and outs hashed) and committed to the cache, under DVC's repository lock; then the
    lock file is written once, beside itself and renamed over it, with the entries of stages
    no longer in dvc.yaml dropped. A lock left empty or unreadable (by an older run, or
    another tool) is set aside with a warning and written again.
    """
    from dvc.repo import Repo, lock_repo  # noqa: PLC0415 (heavy and optional: dvc is needed for --dvc only)

    _repair_rwlock(Path(".dvc/tmp"))
    _set_aside_broken_lock(Path("dvc.lock"))
    with Repo() as repo, lock_repo(repo):
        stages = {s.addressing: s for s in repo.index.stages}
        missing = [n for n in names if n not in stages]
        if missing:
            raise KeyError(f"no such stages in dvc.yaml: {missing[:3]}")
        chosen = [stages[n] for n in names]
        for stage in chosen:
            stage.save()
            stage.commit()
        live: dict[str, set[str]] = {}
        for stage in stages.values():
            live.setdefault(stage.dvcfile.path, set()).add(stage.name)
        for path in dict.fromkeys(s.dvcfile.path for s in chosen):
            group = [s for s in chosen if s.dvcfile.path == path]
            _write_lock(os.path.splitext(path)[0] + ".lock", group, live[path])


def _write_lock(lock: str, stages: list, keep: set[str]) -> None:
    """Record ``stages`` in ``lock`` and drop entries not in ``keep``: one atomic write, in
    DVC's own format (its serializer and its YAML writer)."""
    from dvc.stage.serialize import to_lockfile  # noqa: PLC0415 (heavy and optional: dvc is needed for --dvc only)
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update  # noqa: PLC0415 (heavy and optional: dvc is needed for --dvc only)

    path = Path(lock)
    data = parse_yaml_for_update(path.read_text(encoding="utf-8"), lock) if path.exists() else {}
    if not data:
        data = {"schema": "2.0"}
    recorded = data.get("stages") or {}
    for stage in stages:
        recorded.update(to_lockfile(stage))
    for name in [n for n in recorded if n not in keep]:
        del recorded[name]
    data["stages"] = recorded
    atomic_write_text(dumps_yaml(data), path)


def _set_aside_broken_lock(path: Path) -> None:
    """Move an empty or unreadable lock file aside (DVC refuses to load one), saying so."""
    if not path.exists():
        return
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        broken = not isinstance(data, dict) or not isinstance(data.get("stages"), dict)
    except (yaml.YAMLError, UnicodeDecodeError):
        broken = True
    if broken:
        aside = path.with_name(f"{path.name}.broken")
        os.replace(path, aside)
        print(
            f"warning: {path} was empty or unreadable (moved to {aside}); it is written again "
            "from the current jobs",
            file=sys.stderr,
        )


def _repair_rwlock(tmp: Path) -> None:
    """Reset DVC's stage lock table (``.dvc/tmp/rwlock``) when a killed DVC process left it
    unreadable: every DVC command would refuse to run until it is fixed by hand. Done under
    DVC's own guard of that file."""
    from dvc.lock import make_lock  # noqa: PLC0415 (heavy and optional: dvc is needed for --dvc only)

    path = tmp / "rwlock"
    if not path.exists():
        return
    with make_lock(str(tmp / "rwlock.lock"), tmp_dir=str(tmp)):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            atomic_write_text("{}", path)
            print(f"warning: {path} was unreadable (a killed DVC run): reset", file=sys.stderr)


def commit_to_dvc(names: list[str], jobs: dict[str, dag.Job]) -> int:
    """Record the named stages in dvc.lock (``dvc commit --force``, in one pass), keeping
    their outputs' mtimes."""
    dvc = shutil.which("dvc")
    if dvc is None or not Path(".dvc").is_dir() or not names:
        return 0
    times = _mtimes([o for n in names if n in jobs for o in jobs[n].outputs])
    try:
        from dvc.exceptions import DvcException  # noqa: PLC0415 (optional: dvc may be a separate tool, not importable here)
    except ImportError:  # dvc installed as a separate tool, not importable here: its command
        rc = subprocess.run([dvc, "commit", "--force", "--quiet", *names], check=False).returncode
    else:
        rc = _commit_in_process(names, DvcException)
    for f, (atime, mtime) in times.items():
        if f.exists():
            os.utime(f, ns=(atime, mtime))
    return rc


def _commit_in_process(names: list[str], dvc_exception: type[Exception]) -> int:
    """``dvc commit --force`` of the named stages through DVC's Python API (whose errors are
    ``dvc_exception``): 0, or 1 after printing what ``dvc commit`` would have (or why the disk
    is full)."""
    records: list[logging.LogRecord] = []
    try:
        with _dvc_log_kept(records):
            _commit_once(names)
        rc = 0
    except (dvc_exception, OSError) as err:
        if _disk_full(err, records):
            print(
                "ERROR: dvc commit: the disk is full (no space left to copy the outputs "
                f"into DVC's cache, {_cache_dir()}, or to write dvc.lock); dvc.lock is as "
                "it was: free space, then run `python -m pipeline.sync --dvc` again",
                file=sys.stderr,
            )
        elif isinstance(err, dvc_exception):  # what `dvc commit` would have printed
            for record in records:
                print(f"ERROR: {record.getMessage()}", file=sys.stderr)
            print(f"ERROR: dvc commit: {err}", file=sys.stderr)
        else:
            raise
        rc = 1
    else:
        for record in records:
            print(f"ERROR: {record.getMessage()}", file=sys.stderr)
    return rc


def _cache_dir() -> str:
    return os.path.join(".dvc", "cache")


_FULL = (errno.ENOSPC, errno.EDQUOT)


class _Kept(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _dvc_log_kept(records: list[logging.LogRecord]) -> Iterator[None]:
    """DVC's error log lines kept in ``records`` instead of printed: DVC logs a failed copy
    ("failed to transfer ... No space left on device") and then raises another error ("No
    possible cache link types"); the caller says what happened in one line."""
    handler = _Kept(records)
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data", "dvc_objects")]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        yield
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate


def _disk_full(err: BaseException, records: list[logging.LogRecord] = ()) -> bool:
    """Whether ``err`` comes from a full disk: an ENOSPC (or EDQUOT) anywhere in its chain or
    in the errors DVC logged before raising it."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        e = e.__cause__ or e.__context__
    texts = [os.strerror(n) for n in _FULL]
    for record in records:
        exc = record.exc_info[1] if record.exc_info else None
        if (isinstance(exc, OSError) and exc.errno in _FULL) or any(
            t in record.getMessage() for t in texts
        ):
            return True
    return False


def touch_in_snakemake(names: list[str], jobs: dict[str, dag.Job]) -> int:
    """``snakemake --touch`` for the outputs of the named (current) jobs."""
    snakemake = shutil.which("snakemake")
    if snakemake is None or not names:
        return 0
    targets = [o for n in names for o in jobs[n].outputs]
    cmd = [snakemake, "--touch", "--cores", "1", *targets]
    return subprocess.run(cmd, check=False).returncode


def _print_state(state: dict[str, list[str]], quiet: bool) -> None:
    """Each job not current, with its first reason, on stderr; unless ``quiet`` also each job
    that is current, on stdout."""
    for name, why in state.items():
        if why:
            print(f"not current: {name}: {why[0]}", file=sys.stderr)
        elif not quiet:
            print(f"current: {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.sync", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=None, help="default: $KDIGA_PARAMS or params.yaml")
    ap.add_argument("--dvc", action="store_true", help="record the current jobs in dvc.lock")
    ap.add_argument("--snakemake", action="store_true", help="adopt the current jobs in Snakemake")
    ap.add_argument("--quiet", action="store_true", help="list only the jobs that are not current")
    args = ap.parse_args(argv)
    try:
        path = args.params or params_file()
        params = load_params(path, build=False)  # nothing is built: no torch needed
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = {j.name: j for j in dag.jobs(params)}
    state = freshness(params)
    current = [n for n, why in state.items() if not why]
    _print_state(state, args.quiet)
    rc = 0
    if args.dvc and Path(path).resolve() != Path("params.yaml").resolve():
        print(
            f"not recorded in dvc.lock: the jobs ran with {path}, and DVC's stages read "
            "params.yaml (copy it over params.yaml and run `python -m pipeline.dag` to use DVC)",
            file=sys.stderr,
        )
    elif args.dvc and (stale := dag.check_fresh(path)):
        print(f"not recorded in dvc.lock: {stale}", file=sys.stderr)
        rc |= 1
    elif args.dvc:
        # The guard stage's record, as `dvc repro` would have written it: dvc.yaml is fresh.
        record = dag.dag_record(params)
        if not Path(dag.DAG_RECORD).exists() or Path(dag.DAG_RECORD).read_text() != record:
            atomic_write_text(record, dag.DAG_RECORD)
        bad = {n: why for n in current if n in jobs and (why := output_problem(jobs[n]))}
        for name, why in bad.items():
            print(f"not recorded in dvc.lock: {name}: {why}", file=sys.stderr)
        current = [n for n in current if n not in bad]
        rc |= 1 if bad else 0
        rc |= commit_to_dvc([dag.GUARD, *current], jobs)
        if len(current) < len(state):
            print(
                f"recorded {len(current)} of {len(state)} jobs in dvc.lock; the others are not "
                "current (above): `dvc repro` or `snakemake` redoes them",
                file=sys.stderr,
            )
    if args.snakemake:
        rc |= touch_in_snakemake(current, jobs)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
