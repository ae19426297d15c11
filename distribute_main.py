"""Train SPM on several GPUs (MirroredStrategy) or several machines (MultiWorkerMirroredStrategy).

    python3 distribute_main.py --gpus 2,3 --preset ai_challenger_w32_512 ...   # GPUs 2 and 3, one process
    python3 distribute_main.py --gpus 0,1,2,3 --process-per-gpu ...          # one process per GPU
    python3 distribute_main.py --cpu-replicas 2 ...                           # 2 logical CPUs, no GPU
    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' python3 distribute_main.py ...

``--batch-size`` is per replica: the global batch is batch_size x replicas, and losses are
normalised by the global batch. With TF_CONFIG only the chief (worker 0) writes checkpoints,
summaries and pictures. Other flags are those of main.py.

``--process-per-gpu`` starts one training process per GPU of ``--gpus`` from this command: each
sees one GPU, has its own interpreter and its own input pipeline (one Python process per GPU
cannot feed several fast GPUs), and together they form one MultiWorkerMirroredStrategy cluster on
localhost. With TF_CONFIG (one ``host:port`` per machine, the same ``--gpus`` on each), machine
``m``'s processes listen on ``port``, ``port + 1``, ... and are global workers ``m * G + k``.
``--cpu`` runs the processes on the CPU (tests). If one process fails, the others are stopped;
the exit code is the first failure's, and the chief's summary line is printed.
"""

import json
import logging
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from main import build_parser, run_cli  # noqa: E402  (no TensorFlow import yet)
from utils.distribute import process_per_gpu_environments, select_gpus  # noqa: E402


def _strip(argv, flag: str, with_value: bool):
    """``argv`` without ``flag`` (and its value; ``--flag=value`` too)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = with_value
        elif not (with_value and arg.startswith(flag + "=")):
            out.append(arg)
    return out


def supervise(procs):
    """Wait for ``procs`` (stdout piped); the first to fail stops the others (SIGTERM), and
    SIGINT / SIGTERM sent to this process reach all of them. Returns the first failure's exit
    code (0 when all succeed) and each process's stdout."""

    def stop(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        outputs, code = [""] * len(procs), 0
        pending = set(range(len(procs)))
        while pending:
            for k in sorted(pending):
                try:
                    outputs[k] = procs[k].communicate(timeout=0.5)[0] or ""
                except subprocess.TimeoutExpired:
                    continue
                pending.discard(k)
                if procs[k].returncode != 0 and code == 0:
                    code = procs[k].returncode
                    print(f"error: worker process {k} exited with {code}; stopping the others",
                          file=sys.stderr)
                    stop(signal.SIGTERM, None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, outputs


def launch_process_per_gpu(args, argv) -> int:
    """Start one worker per GPU (see the module docstring); wait; the first failure stops all."""
    try:
        envs = process_per_gpu_environments(args.gpus, cpu=args.cpu)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    child_argv = _strip(_strip(_strip(argv, "--process-per-gpu", False), "--gpus", True), "--cpu", False)
    command = [sys.executable, os.path.abspath(__file__), *child_argv]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for env in envs]
    print(f"started {len(procs)} worker processes ({'CPU' if args.cpu else 'GPUs ' + args.gpus}), "
          f"pids {[p.pid for p in procs]}", file=sys.stderr)
    code, outputs = supervise(procs)
    if json.loads(envs[0]["TF_CONFIG"])["task"]["index"] == 0 and outputs[0]:
        print(outputs[0], end="")                  # the chief's summary line
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(__doc__)
    parser.add_argument("--gpus", default="", help="physical GPU ids to use, e.g. 2,3 (default: all)")
    parser.add_argument("--cpu-replicas", type=int, default=0,
                        help="run N logical CPU replicas (testing without a GPU)")
    parser.add_argument("--process-per-gpu", action="store_true",
                        help="one training process per GPU of --gpus (MultiWorkerMirroredStrategy on localhost)")
    parser.add_argument("--cpu", action="store_true",
                        help="with --process-per-gpu: the processes run on the CPU (the ids only count them)")
    args = parser.parse_args(argv)
    if args.process_per_gpu:
        if not args.gpus:
            parser.error("--process-per-gpu needs --gpus (e.g. --gpus 0,1,2,3)")
        if args.cpu_replicas:
            parser.error("--process-per-gpu and --cpu-replicas exclude each other")
        return launch_process_per_gpu(args, argv)
    if args.cpu:
        parser.error("--cpu goes with --process-per-gpu (for one process on the CPU use main.py)")
    if args.gpus:
        # Before TensorFlow is imported: CUDA reads the variable once, at initialisation.
        try:
            selected = select_gpus(args.gpus)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"using GPUs {selected} (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})",
              file=sys.stderr)

    def strategy():
        # TensorFlow loads here, after --gpus has set CUDA_VISIBLE_DEVICES (it reads it once).
        from utils.distribute import make_strategy

        s = make_strategy(cpu_replicas=args.cpu_replicas)
        logging.info("%s with %d replicas", type(s).__name__, s.num_replicas_in_sync)
        return s

    return run_cli(args, strategy)


if __name__ == "__main__":
    sys.exit(main())
