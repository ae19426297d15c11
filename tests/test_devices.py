"""Device selection for distribute_main.py --gpus (no GPU needed: it only sets CUDA's env)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from utils.distribute import parse_gpu_ids, select_gpus, tf_config_task


def test_gpus_2_3_selects_exactly_those_devices():
    env = {}
    assert select_gpus("2,3", env) == [2, 3]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"   # ids as nvidia-smi numbers them


def test_gpus_are_relative_to_an_existing_visible_list():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}
    assert select_gpus("1,2", env) == [5, 6]
    assert env["CUDA_VISIBLE_DEVICES"] == "5,6"
    with pytest.raises(ValueError, match="exposes only 3 GPUs"):
        select_gpus("3", {"CUDA_VISIBLE_DEVICES": "4,5,6"})


@pytest.mark.parametrize("spec", ["", "a", "1,,2", "-1", "1,1", "0.5"])
def test_bad_gpu_lists_are_refused(spec):
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpu_ids(spec)


def test_tf_config_parsing():
    assert tf_config_task({}) is None
    conf = tf_config_task({"TF_CONFIG": '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}}'})
    assert conf["task"]["index"] == 0
    with pytest.raises(ValueError, match="TF_CONFIG must be JSON"):
        tf_config_task({"TF_CONFIG": '{"cluster": {}}'})


def test_distribute_main_sets_devices_before_tensorflow_starts():
    """In a fresh process, --gpus must reach CUDA_VISIBLE_DEVICES before TensorFlow is imported."""
    code = (
        "import sys, os; sys.argv = ['distribute_main.py', '--gpus', '2,3'];"
        "sys.path.insert(0, %r);"
        "import distribute_main;"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow imported before device selection';"
        "from utils.distribute import select_gpus; select_gpus('2,3');"
        "assert 'tensorflow' not in sys.modules;"
        "print(os.environ['CUDA_VISIBLE_DEVICES'])" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2,3"


def test_process_per_gpu_gives_each_process_one_gpu_and_a_cluster_place():
    from utils.distribute import process_per_gpu_environments

    envs = process_per_gpu_environments("2,3", environ={"PATH": "/bin"}, ports=[4000, 4001])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3"]
    configs = [json.loads(e["TF_CONFIG"]) for e in envs]
    assert all(c["cluster"] == {"worker": ["localhost:4000", "localhost:4001"]} for c in configs)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    assert all(e["PATH"] == "/bin" for e in envs)
    # relative to an existing visible list, as --gpus is
    assert [e["CUDA_VISIBLE_DEVICES"] for e in
            process_per_gpu_environments("0,2", environ={"CUDA_VISIBLE_DEVICES": "5,6,7"}, ports=[1, 2])] == ["5", "7"]
    # --cpu: no process sees a GPU
    assert [e["CUDA_VISIBLE_DEVICES"] for e in process_per_gpu_environments("0,1", cpu=True, environ={})] == ["", ""]


def test_process_per_gpu_across_machines_numbers_workers_globally():
    from utils.distribute import process_per_gpu_environments

    machine1 = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:5000", "b:6000"]},
                                         "task": {"type": "worker", "index": 1}})}
    configs = [json.loads(e["TF_CONFIG"]) for e in process_per_gpu_environments("0,1,2", environ=machine1)]
    assert configs[0]["cluster"]["worker"] == ["a:5000", "a:5001", "a:5002", "b:6000", "b:6001", "b:6002"]
    assert [c["task"]["index"] for c in configs] == [3, 4, 5]          # machine 1, processes 0..2
    bad = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}})}
    with pytest.raises(ValueError, match="host:port"):
        process_per_gpu_environments("0", environ=bad)


@pytest.mark.parametrize("argv, environ, message", [
    (["--process-per-gpu"], {}, "--process-per-gpu needs --gpus (e.g. --gpus 0,1,2,3)"),
    (["--process-per-gpu", "--gpus", "0,1", "--cpu-replicas", "2"], {},
     "--process-per-gpu and --cpu-replicas exclude each other"),
    (["--cpu"], {}, "--cpu goes with --process-per-gpu"),
    (["--gpus", "1"], {"CUDA_VISIBLE_DEVICES": "3"},
     "error: --gpus 1: CUDA_VISIBLE_DEVICES=3 exposes only 1 GPUs, there is no GPU 1 among them"),
    (["--gpus", "0,x"], {}, "error: --gpus"),
    (["--process-per-gpu", "--cpu", "--gpus", "0,1"],
     {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}})},
     "error: TF_CONFIG task type 'chief': --process-per-gpu expects 'worker' tasks, one per machine"),
    (["--process-per-gpu", "--cpu", "--gpus", "0"],
     {"TF_CONFIG": json.dumps({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}})},
     "error: TF_CONFIG worker address 'nohost' is not host:port"),
    (["--cpu-replicas", "2", "--epochs", "1"],
     {"TF_CONFIG": json.dumps({"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}})},
     "--cpu-replicas > 1 cannot be combined with TF_CONFIG"),
])
def test_distribute_main_refuses_each_wrong_combination_with_exit_2(tmp_path, argv, environ, message):
    """Every exit-2 path of distribute_main.py: one line naming the problem, nothing started."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CUDA_VISIBLE_DEVICES")}
    env.update(environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "distribute_main.py"), "--run-dir",
                           str(tmp_path / "run"), *argv], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "started" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_one_failing_worker_process_stops_the_others():
    """--process-per-gpu's supervisor: a worker that fails (exit 3) stops the one still running
    (it would otherwise wait forever in a collective) and its code is the launcher's."""
    import time

    from distribute_main import supervise

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    failing = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"])
    start = time.time()
    assert supervise([sleeper, failing]) == 3 and time.time() - start < 30
    assert sleeper.returncode == -signal.SIGKILL                       # stopped, not finished
    ok = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert supervise(ok) == 0


def test_preempted_workers_are_not_failures_and_the_launcher_exits_75():
    """A worker that saved and exited with 75 (preempted) does not make the supervisor kill the
    others, which are saving too: they finish, and the launcher's code is 75."""
    from distribute_main import supervise
    from utils.preemption import PREEMPTED_EXIT_CODE

    first = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(75)"])
    saving = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(2); sys.exit(75)"])
    assert supervise([first, saving]) == PREEMPTED_EXIT_CODE
    assert saving.returncode == PREEMPTED_EXIT_CODE                    # let it finish its save


# A stand-in for a training worker: the loop's signal rule (utils/preemption.py), then "saving"
# for a second, then exit 75; it writes down what it saw.
_FAKE_WORKER = """
import sys, time
sys.path.insert(0, {root!r})
from utils.preemption import StopRequest
with StopRequest() as stop:
    open(sys.argv[1], "w").write("ready")
    while not stop.requested:
        time.sleep(0.05)
    time.sleep(1.5)
open(sys.argv[1], "w").write(stop.signal_name)
sys.exit(75)
"""

_LAUNCHER = """
import subprocess, sys
sys.path.insert(0, {root!r})
from distribute_main import supervise
procs = [subprocess.Popen([sys.executable, "-c", sys.argv[1], f]) for f in sys.argv[2:]]
sys.exit(supervise(procs))
"""


@pytest.mark.parametrize("to_group", [True, False])
def test_the_launcher_forwards_one_preemption_once(tmp_path, to_group):
    """SIGTERM to the launcher alone (it forwards) and to the launcher and its workers together
    (a scheduler signalling every process, then the launcher forwarding: two deliveries within
    milliseconds): every worker sees one preemption, finishes its save and exits 75, and so does
    the launcher; no worker is killed by the repeat."""
    import time

    marks = [tmp_path / f"w{k}" for k in range(2)]
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER.format(root=ROOT),
                                 _FAKE_WORKER.format(root=ROOT), *map(str, marks)], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not all(m.exists() and m.read_text() == "ready" for m in marks):
        time.sleep(0.05)
    if to_group:
        os.killpg(launcher.pid, signal.SIGTERM)
    else:
        launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 75
    assert [m.read_text() for m in marks] == ["SIGTERM", "SIGTERM"]


def test_a_second_signal_after_the_first_kills_at_once(tmp_path):
    import time

    mark = tmp_path / "w"
    worker = subprocess.Popen([sys.executable, "-c", _FAKE_WORKER.replace("time.sleep(1.5)", "time.sleep(60)")
                               .format(root=ROOT), str(mark)])
    deadline = time.time() + 60
    while time.time() < deadline and not (mark.exists() and mark.read_text() == "ready"):
        time.sleep(0.05)
    worker.send_signal(signal.SIGINT)
    time.sleep(1.3)                                 # past the window in which repeats count once
    start = time.time()
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=30) == -signal.SIGINT and time.time() - start < 5


def test_launcher_ports_are_free_and_outside_the_kernels_ephemeral_range():
    """--process-per-gpu's ports: distinct, below the range the kernel hands out for port-0
    binds (so no other process's bind can take one before the workers do), and a port in use
    is passed over."""
    import random
    import socket

    from utils.distribute import free_local_ports, launcher_port_range

    first, stop = launcher_port_range()
    proc = "/proc/sys/net/ipv4/ip_local_port_range"
    low = int(open(proc).read().split()[0]) if os.path.exists(proc) else 32768
    assert 1024 <= first < stop == low
    ports = free_local_ports(4)
    assert len(set(ports)) == 4 and all(first <= p < low for p in ports)
    taken = random.Random(7).randrange(first, stop)          # the first port seed 7 draws
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", taken))
        s.listen(1)
        again = free_local_ports(2, seed=7)
    assert taken not in again and len(set(again)) == 2
