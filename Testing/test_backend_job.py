"""The shared app layer's BackendJob, with real processes (no Qt needed): progress, outcome messages,
the parameter snapshot, cleanup, a program that never starts, and Cancel stopping a whole process tree
(as PythonSlicer's launcher and its python-real child)."""

import os
import sys
import time

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "LandmarkDetection"))
from LandmarkDetectionAppLib.job import BackendJob, TreeProcess  # noqa: E402


def run_until_finished(job, timeout=60):
    deadline = time.monotonic() + timeout
    while not job.finished:
        assert time.monotonic() < deadline, "the job did not finish"
        job.poll()
        time.sleep(0.05)


def script_process(code):
    """A process factory running ``code`` instead of the backend (it gets the same environment)."""
    return lambda command, environment: TreeProcess([sys.executable, "-c", code], environment)


def test_progress_records_and_success(tmp_path):
    records, outcomes = [], []
    code = ("import json\nfor n in range(3): print(json.dumps({'stage': 'detect', 'step': n + 1, 'total': 3}), "
            "flush=True)\nprint('not json')")
    job = BackendJob(lambda job: ["detect"], records.append, outcomes.append, {"volume": "a"},
                     script_process(code))
    job.start(lambda job: (job.input_path("my scan/1").write_text("x")))
    work = job.work
    assert job.input_path("my scan/1").name == "my_scan_1.nrrd"
    run_until_finished(job)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert outcomes[0].ok and outcomes[0].message == "" and job.parameters == {"volume": "a"}
    assert not work.exists()  # cleaned up after the results were handed over


def test_the_backend_error_line_becomes_the_message():
    outcomes = []
    code = "import sys\nprint('Traceback noise', file=sys.stderr)\nprint('error: scan.nii: is 2D', file=sys.stderr)\nsys.exit(2)"
    job = BackendJob(lambda job: [], lambda r: None, outcomes.append, process_factory=script_process(code))
    job.start()
    run_until_finished(job)
    assert not outcomes[0].ok and outcomes[0].message == "scan.nii: is 2D"


def test_a_process_that_never_starts_is_reported_and_cleaned_up(tmp_path):
    outcomes = []

    def missing_program(command, environment):
        return TreeProcess([str(tmp_path / "no-such-python")], environment)

    job = BackendJob(lambda job: [], lambda r: None, outcomes.append, process_factory=missing_program)
    job.start()
    assert job.finished and not outcomes[0].ok and "could not start the backend" in outcomes[0].message
    assert not job.work.exists()


def test_an_export_failure_is_reported_and_cleaned_up():
    outcomes = []

    def export(job):
        raise ValueError("volume.nrrd: disk full")

    job = BackendJob(lambda job: [], lambda r: None, outcomes.append, process_factory=script_process("pass"))
    job.start(export)
    assert job.finished and "disk full" in outcomes[0].message and not job.work.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_stops_the_launcher_and_its_child(tmp_path):
    """Like PythonSlicer, the process starts a child and waits for it; Cancel must stop both."""
    child_pid = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
            "print('{\"stage\": \"detect\", \"step\": 0, \"total\": 1}', flush=True)\n"
            "child.wait()")
    records, outcomes = [], []
    job = BackendJob(lambda job: [], records.append, outcomes.append, process_factory=script_process(code))
    job.start()
    deadline = time.monotonic() + 30
    while not (records and child_pid.exists() and child_pid.read_text()):
        assert time.monotonic() < deadline
        job.poll()
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    job.cancel()
    run_until_finished(job)
    assert outcomes[0].message == "Cancelled."
    deadline = time.monotonic() + 10
    while True:  # the orphaned child would live on for two minutes
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a killed child that is not yet reaped is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split()[2] == "Z":
                break
        assert time.monotonic() < deadline, "the child process survived Cancel"
        time.sleep(0.1)


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_an_abandoned_job_stops_cleans_up_and_never_calls_back(tmp_path):
    """A module reloaded (or Slicer closing) while a job runs: its widget is gone, so nothing may call it."""
    started = tmp_path / "started"
    code = (f"import json, time\nopen({str(started)!r}, 'w').close()\n"
            "print(json.dumps({'stage': 'detect', 'step': 0, 'total': 1}), flush=True)\ntime.sleep(120)")
    calls = []
    job = BackendJob(lambda job: [], calls.append, calls.append, process_factory=script_process(code))
    job.start(lambda job: job.input_path("scan").write_text("x"))
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    work, process = job.work, job.process.process
    job.abandon()
    assert job.finished and not work.exists()
    process.wait(timeout=10)  # the whole group was killed: it ends at once
    time.sleep(0.2)
    job.poll()  # a timer that fired once more
    assert calls == []
