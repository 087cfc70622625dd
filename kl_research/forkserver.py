"""A fork server for the local launcher: jobs start from a process that has already imported torch and transformers.

Every local sweep job used to be a fresh ``python -m submitit.core._submit <folder>``, and before its first step it
spent ~5 s importing torch, transformers and the trainer (docs/performance.md, "where a sweep job's time goes"). With
``hydra.launcher.fork_server=true`` the launcher starts one server per sweep, which imports those modules once and
then, for each job, ``fork()``s a child that runs exactly what ``submitit.core._submit`` runs
(``submitit.core.submission.process_job``). The modules are shared copy-on-write; nothing has run in the server, so
each child starts clean: no torch thread pool exists before the child sets its own thread count (the trainer's
``threads`` key), no CUDA context, no seeds drawn (the trainer seeds every generator itself).

What submitit's local controller starts as the job's task is then this module's small client (stdlib only, ~50 ms):

    python -P -u .../kl_research/forkserver.py client <socket> <submitit folder>

It sends the server its environment, working directory and stdin/stdout/stderr (as file descriptors, over a Unix
socket), waits for the child's exit status and exits with it, and forwards the signals the controller sends (SIGINT,
SIGTERM, SIGUSR1/2: cancel, timeout, requeue) to the child. So the controller, its logs, submitit's requeue on
timeout and the launcher see what they saw before. If the client dies (SIGKILL), the server kills its child; if no
server answers, the client runs the job the ordinary way (``exec`` of ``submitit.core._submit``).

The server is Linux-only (``SOCK_SEQPACKET`` Unix sockets, ``SCM_RIGHTS``); elsewhere the launcher does not start it.
This module imports only the standard library: the client must start fast.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# the signals the client passes on to the job (submitit's local controller sends SIGINT to cancel, SIGUSR2 before a
# timeout; SIGTERM and SIGUSR1 for anything else that stops jobs by signal)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_MAX_MSG = 1 << 20


def supported() -> bool:
    """Whether this platform has what the server needs (fork, SOCK_SEQPACKET Unix sockets, fd passing)."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")


def _submit_argv(folder: str) -> list[str]:
    """The command submitit's local executor runs for a job's task without a fork server."""
    return [sys.executable, "-u", "-m", "submitit.core._submit", folder]


# ------------------------------------------------------------------------------------------------ server
def _run_job(folder: str) -> int:
    """In the forked child: what ``python -m submitit.core._submit <folder>`` runs, with its exit code."""
    from submitit.core.submission import process_job

    try:
        process_job(folder)
        code = 0
    except SystemExit as e:  # submitit's requeue (LOCAL_REQUEUE_RETURN_CODE), a job's own sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # as the interpreter would: the traceback on stderr, exit status 1
        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()  # what the interpreter runs at exit (logging's flush, the trainer's own handlers)
    return code


def _child(request: dict, fds: list[int], closing: list[socket.socket]) -> None:
    """The forked job process: become the client's process (its stdio, directory, environment), run, _exit."""
    code = 1
    try:
        for s in closing:
            s.close()
        for target, fd in zip((0, 1, 2), fds, strict=False):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt, as in any python
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["-m", request["folder"]]
        code = _run_job(request["folder"])
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _send(conn: socket.socket, msg: dict) -> None:
    with contextlib.suppress(OSError):
        conn.send(json.dumps(msg).encode())


def serve(address: str, preload: list[str], path: str | None = None) -> int:
    """Listen on ``address``, import ``preload``, then fork one child per client until SIGTERM and no child is left.

    The socket is bound before the imports, so clients that connect early wait in the backlog instead of failing."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if path and path not in sys.path:
        sys.path.insert(0, path)
    t0 = time.perf_counter()
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as e:  # each job then imports it itself, as without the server
            print(f"fork server: could not preload {name!r} ({type(e).__name__}: {e}); jobs import it themselves")
    print(f"fork server: pid {os.getpid()}, preloaded {preload} in {time.perf_counter() - t0:.1f} s", flush=True)
    gc.collect()
    gc.freeze()  # the imported objects stay out of every child's collections
    parent = os.getppid()
    children: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select(timeout=0.2):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    data, fds, _, _ = socket.recv_fds(conn, _MAX_MSG, 3)
                    request = json.loads(data)
                except (OSError, ValueError) as e:
                    print(f"fork server: bad request ({e})", flush=True)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, [listener, conn, *children.values()])
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                sel.register(conn, selectors.EVENT_READ, pid)
                _send(conn, {"pid": pid})
            else:  # the client's end: it sends nothing, so readable means closed (it died): so does its job
                conn, pid = key.fileobj, key.data
                with contextlib.suppress(OSError):
                    if conn.recv(16) == b"":
                        sel.unregister(conn)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid)
            _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(conn)
            conn.close()
        if (stopping or os.getppid() != parent) and not children:
            break
    listener.close()
    return 0


class ForkServer:
    """Starts the server (``python -m kl_research.forkserver serve``) and returns once its socket is bound;
    ``address`` is the socket, ``client_command`` a job's task, ``stop()`` ends the server once its jobs have ended."""

    def __init__(self, preload: list[str], path: str | None = None, log: Path | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="kl-fork-")  # 0700: only this user can connect
        self.address = os.path.join(self._dir, "socket")
        cmd = [sys.executable, "-u", "-m", "kl_research.forkserver", "serve", self.address, "--preload", *preload]
        if path:
            cmd += ["--path", path]
        self._log = open(log, "a") if log is not None else subprocess.DEVNULL  # closed in stop()
        here = str(Path(__file__).resolve().parents[1])  # so that `-m kl_research.forkserver` finds this copy
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.address):  # bound before its imports: a second at most
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fork server did not start (exit {self.process.poll()}); see {log}")
            time.sleep(0.02)

    def client_command(self, folder: str | Path) -> list[str]:
        """The job's task: this very file run as a script (found whatever the controller's sys.path; -P: its folder
        is not put on sys.path, where our module names could shadow others)."""
        return [sys.executable, "-P", "-u", str(Path(__file__).resolve()), "client", self.address, str(folder)]

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.address)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


# ------------------------------------------------------------------------------------------------ client
def client(address: str, folder: str) -> int:
    """The job's task as submitit's controller sees it: the server's child runs the job; this process stands in for
    it (signals in, exit status out). Without a server, the job runs here, as submitit would run it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(address)
        request = {"folder": folder, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
        reply = sock.recv(_MAX_MSG)
        pid = json.loads(reply)["pid"]
    except (OSError, ValueError, KeyError) as e:
        sock.close()
        print(f"fork server at {address} did not answer ({type(e).__name__}: {e}); running the job here", flush=True)
        argv = _submit_argv(folder)
        os.execv(argv[0], argv)

    def forward(signum, frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    reply = sock.recv(_MAX_MSG)  # blocks until the child ends (retried across the forwarded signals: PEP 475)
    if reply:
        code = json.loads(reply)["exit"]
        return 128 - code if code < 0 else code  # killed by signal n: 128 + n, as a shell reports it
    # the server went away first: wait for the job itself, whose status is then unknown
    while _alive(pid):
        time.sleep(0.5)
    print(f"fork server at {address} went away; job process {pid} ended with an unknown status", flush=True)
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("address")
    s.add_argument("--preload", nargs="*", default=[])
    s.add_argument("--path", default=None)
    c = sub.add_parser("client")
    c.add_argument("address")
    c.add_argument("folder")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.address, args.preload, args.path)
    return client(args.address, args.folder)


if __name__ == "__main__":
    sys.exit(main())
