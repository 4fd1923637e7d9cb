"""Stage jobs started warm: a fork server that has imported torch once.

Every stage job is a ``python -m pipeline.stages <stage> ...`` process, the command Snakemake
and DVC share, and importing torch (and torchvision) costs each one 1.5 to 3 s of CPU before any
work: in a small study that is more than the work, and a study of a hundred jobs pays it a
hundred times. With ``KDIGA_FORKSERVER=1`` (the Snakefile sets it for the jobs it runs on this
machine; export it to have DVC's jobs use it too) a job hands itself to a server process of
the same Python that has imported the heavy libraries once. The server forks a child, which
takes the job's arguments, working directory, environment, umask, module search path and
standard streams, and runs the stage as the job itself would have. The job's process waits
and exits with the child's status.

- Nothing of the project is imported by the server: a child imports ``pipeline`` and
  ``kdiga`` afresh from its job's path, so an edit takes effect in the next job, and studies
  with their own copy of the code share one server. Nothing initialises CUDA before the
  fork: a child picks its GPU (``CUDA_VISIBLE_DEVICES``) as a fresh process does.
- The child follows its job: SIGINT, SIGTERM and SIGHUP sent to the job are passed on, and a
  child whose job has gone (killed, even with SIGKILL) kills itself at once.
- A job that finds no server starts one and waits for it (a job that would otherwise import
  torch itself loses nothing); if none answers within ``STARTUP_S``, it runs itself. The
  server serves one interpreter, listens on a socket in a private folder
  (``$KDIGA_FORKSERVER_DIR``, else ``$XDG_RUNTIME_DIR/kdiga-forkserver``, else
  ``/tmp/kdiga-forkserver-<uid>``) and exits after ``$KDIGA_FORKSERVER_IDLE`` seconds
  (default 120) without a job; ``python -m pipeline.forkserver --stop`` ends it sooner.
- Jobs that are torchrun workers (``RANK`` set), and the processes a child starts, run
  themselves.

The same job gives the same bytes either way (tests/test_forkserver.py): only the process
that runs it changes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import gc
import hashlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ENABLE_ENV = "KDIGA_FORKSERVER"
IDLE_ENV = "KDIGA_FORKSERVER_IDLE"
DIR_ENV = "KDIGA_FORKSERVER_DIR"  # the servers' folder (default: see _folder)
#: set in a child: a job it starts (``python -m pipeline.stages <stage>`` again) runs itself
CHILD_ENV = "KDIGA_FORKSERVER_CHILD"
STARTUP_S = 30.0  # the most a job waits for a server that is starting (importing torch)
#: imported once by the server; each may be missing (torchvision is optional to kdiga).
#: torch._dynamo: torch.optim imports it (with sympy) on a model's first optimiser, about
#: 1.5 s of every training job.
PRELOAD = (
    "numpy",
    "yaml",
    "torch",
    "torch.nn.functional",
    "torch._dynamo",
    "safetensors.torch",
    "torchvision",
    # imported by every stage module at its top (kdiga.stream, kdiga.attacks)
    "torchvision.transforms.v2",
    "webdataset",
    "pyautoattack",
)
#: the project's packages: imported by each child from its own job's path
PROJECT = ("pipeline", "kdiga")
_RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _folder() -> Path:
    base, uid = os.environ.get("XDG_RUNTIME_DIR"), os.getuid()
    folder = Path(base) / "kdiga-forkserver" if base else Path(f"/tmp/kdiga-forkserver-{uid}")
    folder = Path(os.environ.get(DIR_ENV) or folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != uid or folder.stat().st_mode & 0o077:
        raise PermissionError(f"{folder} is not a private folder of this user")
    return folder


def socket_path() -> Path:
    """The socket of the server for this interpreter (its executable, prefix and version) and
    this module's code: a server started by other code never serves a job."""
    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(f"{os.path.realpath(sys.executable)}\0{sys.prefix}\0{sys.version}".encode())
    return _folder() / f"{key.hexdigest()[:16]}.sock"


# -- the job's side ------------------------------------------------------------------------


def delegate(module: str) -> int | None:
    """Run this process's job (``python -m <module> <sys.argv[1:]>``) in a child of the fork
    server and return its exit code; None when the job should run itself (the server is
    off, or none answered)."""
    if os.environ.get(ENABLE_ENV) != "1" or os.environ.get(CHILD_ENV) or "RANK" in os.environ:
        return None
    try:
        conn = _connect(socket_path())
    except OSError:
        return None
    if conn is None:
        return None
    with conn:
        return _run_remote(conn, module)


def _connect(path: Path) -> socket.socket | None:
    """A connection to the server at ``path``, starting one if none listens."""
    deadline = time.monotonic() + STARTUP_S
    started = False
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
        if not started:
            _start_server(path)
            started = True
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _start_server(path: Path) -> None:
    """Start a server in its own session, detached from this job's streams."""
    env = {k: v for k, v in os.environ.items() if k != CHILD_ENV}
    # The server imports this module from the job's path; nothing else of the project.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    subprocess.Popen(
        [sys.executable, "-m", "pipeline.forkserver", "--serve", str(path)],
        cwd="/",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _run_remote(conn: socket.socket, module: str) -> int | None:
    """The job's exit code from the server; None if the server did not take the job (it was
    ending, or failed), which then runs here."""
    request = {
        "module": module,
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "path": sys.path,
        "umask": _umask(),
        "pid": os.getpid(),
    }
    payload = json.dumps(request).encode()
    try:
        socket.send_fds(conn, [len(payload).to_bytes(8, "big")], [0, 1, 2])
        conn.sendall(payload)
        reader = conn.makefile("r")
        first = reader.readline()
    except OSError:
        return None
    if not first.startswith("pid "):
        return None
    child = int(first.split()[1])

    def relay(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in _RELAYED:
        signal.signal(signum, relay)
    try:
        status = reader.readline().split()
    except OSError:
        status = []
    if len(status) != 2 or status[0] not in ("exit", "signal"):
        print("kdiga fork server: lost the job's status (the server ended)", file=sys.stderr)
        return 1
    if status[0] == "signal":  # die as the child did, so the caller sees the same
        signum = int(status[1])
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return int(status[1])


def _umask() -> int:
    old = os.umask(0o077)
    os.umask(old)
    return old


def stage_main(module: str, main: Any) -> int:
    """``main()`` of stage ``module`` run as a script: in a child of the fork server when one
    serves this job, else here."""
    code = delegate(module)
    return main() if code is None else code


# -- the server's side ---------------------------------------------------------------------


def serve(path: Path, idle: float) -> int:
    """Serve jobs on ``path`` until ``idle`` seconds pass without one."""
    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (held for the server's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another server serves this interpreter
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))  # bound before the imports: jobs that connect now wait for them
    listener.listen(64)
    inode = path.stat().st_ino
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # The preloaded objects (torch's are millions) move out of the collector's reach: a child
    # would otherwise scan them all at each full collection, 0.1-0.2 s a time on a CPU core.
    gc.collect()
    gc.freeze()
    jobs: dict[int, socket.socket] = {}
    last = time.monotonic()
    try:
        while jobs or (time.monotonic() - last < idle and _bound(path, inode)):
            ready, _, _ = select.select([listener], [], [], 0.1)
            if ready and _bound(path, inode):
                conn, _ = listener.accept()
                pid = _fork_job(conn, [listener, lock, *jobs.values()])
                if pid is not None:
                    jobs[pid] = conn
                last = time.monotonic()
            _reap(jobs)
            if jobs:
                last = time.monotonic()
    finally:
        if _bound(path, inode):
            path.unlink()
        listener.close()
    return 0


def _bound(path: Path, inode: int) -> bool:
    """Whether ``path`` is still this server's socket (``--stop`` removes it)."""
    try:
        return path.stat().st_ino == inode
    except FileNotFoundError:
        return False


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 8, 3)
    if len(head) != 8:
        raise ValueError("truncated request")
    size = int.from_bytes(head, "big")
    payload = b""
    while len(payload) < size:
        more = conn.recv(size - len(payload))
        if not more:
            raise ValueError("truncated request")
        payload += more
    return json.loads(payload), list(fds)


def _fork_job(conn: socket.socket, server_files: list) -> int | None:
    """Fork a child for the job on ``conn``; its pid. The child closes ``server_files`` (the
    listener, the server's lock, the other jobs' connections)."""
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError):
        conn.close()
        return None
    if len(fds) != 3:
        conn.close()
        return None
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for f in [*server_files, conn]:
                f.close()
            code = _child(request, fds)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(f"pid {pid}\n".encode())
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid


def _reap(jobs: dict[int, socket.socket]) -> None:
    while jobs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = jobs.pop(pid, None)
        if conn is None:
            continue
        if os.WIFSIGNALED(status):
            message = f"signal {os.WTERMSIG(status)}\n"
        else:
            message = f"exit {os.waitstatus_to_exitcode(status)}\n"
        with contextlib.suppress(OSError):
            conn.sendall(message.encode())
        conn.close()


def _child(request: dict, fds: list[int]) -> int:
    """Become the job of ``request`` and run it; its exit code."""
    for signum in (*_RELAYED, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGPIPE else signal.SIG_IGN)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    _follow(request["pid"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[CHILD_ENV] = "1"
    os.umask(request["umask"])
    sys.path[:] = request["path"]
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT]:
        del sys.modules[name]
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [request["module"], *request["argv"]]
    code: Any = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # what the interpreter prints for an uncaught error, then exit 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return code


def _follow(job_pid: int) -> None:
    """Kill this process as soon as the job ``job_pid`` is gone (however it died)."""
    try:
        fd = os.pidfd_open(job_pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="follow-job", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.forkserver", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--serve", metavar="SOCKET", help="serve jobs on this socket")
    ap.add_argument("--stop", action="store_true", help="stop this interpreter's server")
    args = ap.parse_args(argv)
    if args.serve:
        return serve(Path(args.serve), float(os.environ.get(IDLE_ENV, "120")))
    path = socket_path()
    if args.stop:
        return _stop(path)
    print(f"{path}: {'serving' if path.exists() else 'not running'}")
    return 0


def _stop(path: Path) -> int:
    """Ask the server to end by removing its socket; it exits when its jobs have ended."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
