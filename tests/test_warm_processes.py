"""The warm interpreter of the tests' command-line runs behaves as ``python ARGS`` started cold.

Each case runs the same command both ways and compares what a test can see: exit status, stdout, stderr
(tracebacks included), ``sys.argv``, ``sys.path[0]``, the working folder and the environment.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import warm_processes

SHOW = "import os, sys; print(sys.argv, repr(sys.path[0]), os.getcwd(), os.environ.get('ONLY_HERE'))"
CASES = {
    "-c and its arguments": ["-c", SHOW, "a", "b c"],
    "sys.exit with a code": ["-c", "import sys; print('out'); sys.exit(3)"],
    "sys.exit with a message": ["-c", "raise SystemExit('stopped here')"],
    "an exception": ["-c", "def f():\n    raise ValueError('boom')\nf()"],
    "an uncaught KeyboardInterrupt": ["-c", "raise KeyboardInterrupt"],
    "atexit and a thread": [
        "-c",
        "import atexit, threading, time\natexit.register(print, 'at exit')\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()",
    ],
    "-m": ["-m", "json.tool", "--help"],
}


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_a_warm_run_shows_what_a_cold_run_shows(argv, tmp_path):
    command = [sys.executable, *argv]
    env = {**os.environ, "ONLY_HERE": "yes"}
    cold = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    warm = warm_processes.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert isinstance(warm, subprocess.CompletedProcess) and warm.args == command
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)


def test_a_script_runs_with_its_folder_first_on_the_path(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 7\n")
    script = tmp_path / "script.py"
    script.write_text("import sys, helper; print(helper.VALUE, sys.argv, sys.path[0])\n")
    command = [sys.executable, str(script), "--flag"]
    cold = subprocess.run(command, capture_output=True, text=True, timeout=60)
    warm = warm_processes.run(command, capture_output=True, text=True, timeout=60)
    assert warm.stdout == cold.stdout == f"7 [{str(script)!r}, '--flag'] {tmp_path}\n"


def test_popen_signals_and_merged_streams():
    code = "import signal, sys, time\nprint('up', flush=True)\nprint('err', file=sys.stderr, flush=True)\n"
    code += "time.sleep(60)"
    process = warm_processes.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert isinstance(process, warm_processes.Popen)
    time.sleep(1)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGTERM and output == "up\nerr\n"


def test_a_timeout_kills_the_child_and_raises():
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        warm_processes.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert time.monotonic() - started < 30


def test_an_import_time_variable_gets_its_own_interpreter():
    """OpenMP reads OMP_NUM_THREADS when torch is imported: the server that imported it must have it too."""
    code = "import torch; print(torch.get_num_threads())"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = warm_processes.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout == "1\n", done.stderr
