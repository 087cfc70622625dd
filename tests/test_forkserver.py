"""The local launcher's fork server (kl_research/forkserver.py) under submitit's own local executor: jobs run in the
server's children with the task's environment, directory and stdio; exit status and signals pass through the client;
a dead client takes its job with it; without a server the client runs the job itself. Each job here is a function
(pickled by value: defined inside the tests), so no torch is needed and each test takes a few seconds."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path

import conftest
import pytest
from conftest import child_pids

from hydra_plugins.kl_research_sweeper.launchers import use_fork_server
from kl_research import forkserver

pytestmark = pytest.mark.skipif(not forkserver.supported(), reason="the fork server is Linux-only")


def gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(") ")[-1].startswith("Z")


wait_for = functools.partial(conftest.wait_for, poll=0.1)  # these jobs are quick: poll often


@pytest.fixture
def server(tmp_path):
    s = forkserver.ForkServer(["json"], log=tmp_path / "server.log")
    yield s
    s.stop()


def executor(folder: Path, server):
    import submitit

    ex = submitit.AutoExecutor(folder, cluster="local")
    ex.update_parameters(timeout_min=5)
    if server is not None:
        use_fork_server(ex, server)
    return ex


def test_a_job_runs_in_a_child_of_the_server_with_the_tasks_env_cwd_and_stdio(tmp_path, server, monkeypatch):
    monkeypatch.setenv("KL_FORK_TEST", "from the launcher")
    monkeypatch.chdir(tmp_path)

    def job(x):
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        return x + 1, os.getppid(), os.getcwd(), os.environ.get("KL_FORK_TEST"), os.environ.get("SUBMITIT_LOCAL_JOB_ID")

    j = executor(tmp_path / "jobs", server).submit(job, 41)
    value, ppid, cwd, var, job_id = j.result()
    assert (value, ppid, cwd, var, job_id) == (42, server.process.pid, str(tmp_path), "from the launcher", j.job_id)
    assert "to stdout" in j.stdout() and "to stderr" in j.stderr()
    assert "preloaded ['json']" in (tmp_path / "server.log").read_text()


def test_a_failing_job_reports_its_error_and_exit_statuses_reach_the_controller(tmp_path, server):
    """An exception comes back as submitit's job error; an exit status of 144 (submitit's local requeue code) makes the
    controller start the task again, which only happens if the client exits with the child's status."""
    ex = executor(tmp_path / "jobs", server)
    with pytest.raises(Exception, match="invalid literal for int"):
        ex.submit(int, "x").result()

    marker = tmp_path / "first_run_done"

    def requeued_once():
        if not marker.exists():
            marker.touch()
            sys.exit(144)
        return "second run"

    assert ex.submit(requeued_once).result() == "second run"


def test_signals_reach_the_job_and_a_killed_task_or_cancel_ends_it(tmp_path, server):
    ex = executor(tmp_path / "jobs", server)
    got = tmp_path / "got_usr1"

    def sleeper(pid_file):
        signal.signal(signal.SIGUSR1, lambda *_: got.touch())
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(120)

    for how in ("signal, then cancel", "kill -9 the task"):
        pid_file = tmp_path / f"pid_{how[:4]}"
        j = ex.submit(sleeper, str(pid_file))
        wait_for(pid_file.exists, 30, "the job to start")
        job_pid = int(pid_file.read_text())
        (task,) = child_pids(int(j.job_id))  # the controller's task: the fork server's client
        assert job_pid in child_pids(server.process.pid) and task != job_pid
        if how == "signal, then cancel":
            os.kill(task, signal.SIGUSR1)
            wait_for(got.exists, 10, "SIGUSR1 to reach the job through its task")
            j.cancel()  # submitit: SIGINT to the controller, which stops its task
        else:
            os.kill(task, signal.SIGKILL)
        wait_for(lambda pid=job_pid: gone(pid), 20, f"the job to end after: {how}")
    wait_for(lambda: child_pids(server.process.pid) == [], 5, "the server to reap its children")


def test_without_a_server_the_task_runs_the_job_itself(tmp_path, server):
    ex = executor(tmp_path / "jobs", server)
    server.stop()
    j = ex.submit(os.getppid)
    assert j.result() == int(j.job_id)  # the task, exec'd into submitit's own runner, is the controller's child
    assert "did not answer" in j.stdout()
