"""Device selection and tf.distribute strategies for ``distribute_main.py``.

GPU ids are *physical* ids as ``nvidia-smi`` numbers them. They are applied through
``CUDA_VISIBLE_DEVICES`` (with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so the numbering matches
``nvidia-smi``) *before* TensorFlow is imported, which is the only point where CUDA can still be
told which devices to expose; TensorFlow then sees them as ``/gpu:0 .. /gpu:N-1``. The earlier
implementation hard-coded device lists and could only use 0,1 or 0,1,2.

This module does not import TensorFlow at import time, so the caller can select devices first.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
from typing import Dict, List, MutableMapping, Optional, Tuple


def parse_gpu_ids(spec: str) -> List[int]:
    """``"2,3"`` -> ``[2, 3]``; rejects empty items, negatives, duplicates and non-integers."""
    ids = []
    for item in spec.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"--gpus {spec!r}: {item!r} is not a GPU id (use e.g. --gpus 2,3)")
        if int(item) in ids:
            raise ValueError(f"--gpus {spec!r}: GPU {item} is listed twice")
        ids.append(int(item))
    return ids


def select_gpus(spec: str, environ: Optional[MutableMapping[str, str]] = None) -> List[int]:
    """Expose exactly the GPUs of ``spec`` to CUDA, in ``environ`` (default ``os.environ``).

    Must run before TensorFlow is imported. If ``CUDA_VISIBLE_DEVICES`` is already set, the ids
    are taken relative to that list (so ``CUDA_VISIBLE_DEVICES=4,5,6 --gpus 1`` selects GPU 5).
    Returns the physical ids selected.
    """
    environ = os.environ if environ is None else environ
    ids = parse_gpu_ids(spec)
    current = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if current:
        physical = [p.strip() for p in current.split(",") if p.strip()]
        bad = [i for i in ids if i >= len(physical)]
        if bad:
            raise ValueError(f"--gpus {spec}: CUDA_VISIBLE_DEVICES={current} exposes only "
                             f"{len(physical)} GPUs, there is no GPU {bad[0]} among them")
        selected = [physical[i] for i in ids]
    else:
        selected = [str(i) for i in ids]
        environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(selected)
    return [int(s) if s.isdigit() else s for s in selected]


def tf_config_task(environ: Optional[MutableMapping[str, str]] = None) -> Optional[Dict]:
    """The parsed ``TF_CONFIG`` (cluster + task) or None when it is not set."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        conf = json.loads(raw)
        conf["cluster"], conf["task"]["type"], conf["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("TF_CONFIG must be JSON like {\"cluster\": {\"worker\": [\"host:port\", ...]}, "
                         "\"task\": {\"type\": \"worker\", \"index\": 0}}") from None
    return conf


def launcher_port_range() -> Tuple[int, int]:
    """``[first, stop)``: where :func:`free_local_ports` draws, just below the kernel's range for
    port-0 binds and outgoing connections (Linux's ``ip_local_port_range``; its default elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            stop = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        stop = 32768
    return (10000 if stop > 12000 else 1024), stop


def free_local_ports(count: int, seed: Optional[int] = None) -> List[int]:
    """``count`` distinct TCP ports free on localhost now, drawn at random from
    :func:`launcher_port_range` and checked by binding them (then released for the workers to bind).

    A port the kernel handed out for a port-0 bind could be handed to another process (a
    concurrent job or test, any outgoing connection) in the seconds before the workers bind it;
    the kernel never hands out ports outside its ephemeral range, so only another caller of this
    function could collide, with a chance of about ``count**2 / 20000``.
    """
    first, stop = launcher_port_range()
    rng = random.Random(seed)
    ports: List[int] = []
    for _ in range(200 * count):
        port = rng.randrange(first, stop)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free TCP ports between {first} and {stop} on localhost")


def process_per_gpu_environments(gpu_spec: str, cpu: bool = False,
                                 environ: Optional[MutableMapping[str, str]] = None,
                                 ports: Optional[List[int]] = None) -> List[Dict[str, str]]:
    """The environment of each training process of ``--process-per-gpu``: one per GPU of
    ``gpu_spec`` (``"0,1,2,3"``), each seeing only its GPU (``CUDA_VISIBLE_DEVICES``, as
    :func:`select_gpus` numbers them) and holding a ``TF_CONFIG`` that makes all of them one
    MultiWorkerMirroredStrategy cluster, each with its own interpreter and input pipeline.

    Without ``TF_CONFIG`` the cluster is this machine: workers on ``localhost`` at free ports
    (``ports`` to choose them). With ``TF_CONFIG`` listing one ``host:port`` per machine (the same
    GPU list on every machine), machine ``m`` runs workers at ``host:port``, ``host:port + 1``, ...,
    and its local process ``k`` is global worker ``m * G + k``; worker 0 of machine 0 is the
    chief. ``cpu``: the processes see no GPU (tests; the ids then only count the processes).
    """
    environ = os.environ if environ is None else environ
    ids = parse_gpu_ids(gpu_spec)
    count = len(ids)
    conf = tf_config_task(environ)
    if conf is None:
        ports = ports or free_local_ports(count)
        workers = [f"localhost:{p}" for p in ports]
        first = 0
    else:
        if conf["task"]["type"] != "worker":
            raise ValueError(f"TF_CONFIG task type {conf['task']['type']!r}: --process-per-gpu expects "
                             f"'worker' tasks, one per machine")
        machines = conf["cluster"].get("worker", [])
        workers = []
        for address in machines:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"TF_CONFIG worker address {address!r} is not host:port")
            workers += [f"{host}:{int(port) + k}" for k in range(count)]
        first = int(conf["task"]["index"]) * count
    envs = []
    for k, gpu in enumerate(ids):
        env = dict(environ)
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            select_gpus(str(gpu), env)
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                       "task": {"type": "worker", "index": first + k}})
        envs.append(env)
    return envs


def make_strategy(cpu_replicas: int = 0, environ: Optional[MutableMapping[str, str]] = None):
    """The strategy for this process.

    - ``TF_CONFIG`` set: MultiWorkerMirroredStrategy (all local GPUs, or the CPU, per worker).
    - ``cpu_replicas`` N > 0: MirroredStrategy over N logical CPU devices (tests, no GPU needed).
    - otherwise: MirroredStrategy over every visible GPU (see :func:`select_gpus`), or the CPU.
    """
    # TensorFlow is imported here so that select_gpus() runs without it (before GPU selection).
    import tensorflow as tf

    if tf_config_task(environ) is not None:
        if cpu_replicas > 1:
            raise ValueError("--cpu-replicas > 1 cannot be combined with TF_CONFIG (one CPU replica per worker)")
        # Its coordination service installs a C++ SIGTERM handler of its own that only records
        # the signal (for TensorFlow's PreemptionCheckpointHandler): the process keeps the
        # handler it had (the runner's stop request, or the default action), or a scheduler's
        # SIGTERM would be swallowed.
        previous = signal.getsignal(signal.SIGTERM)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        return strategy
    if cpu_replicas > 0:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_replicas)])
        tf.config.set_visible_devices([], "GPU")
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
        return tf.distribute.MirroredStrategy(devices=devices)
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    return tf.distribute.MirroredStrategy()


def strategy_name(strategy) -> str:
    """The strategy's public name for the log (TensorFlow's class behind
    MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy)."""
    import tensorflow as tf  # only called once make_strategy has loaded it

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__
