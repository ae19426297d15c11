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
the exit code is the first failure's. The chief's console streams through live.

SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) reach every worker once; each saves a
checkpoint at the same step and exits with 75, as this command then does: run it again to
resume; during the workers' start-up, each stops before its first step with nothing to save, and
exits with 75 too. A second signal, a second or more after the first, kills at once.
"""

import json
import logging
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from main import build_parser, run_cli  # noqa: E402  (no TensorFlow import yet)
from utils.distribute import process_per_gpu_environments, select_gpus  # noqa: E402
from utils.preemption import PREEMPTED_EXIT_CODE, StopRequest  # noqa: E402


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
    """Wait for ``procs``. The first to fail stops the others (SIGKILL: they cannot save without
    it, its collectives are gone); a worker that exits with PREEMPTED_EXIT_CODE is not a failure.
    SIGINT / SIGTERM sent to this process reach every worker once (``utils/preemption.py``: a
    repeat within a second, e.g. a scheduler signalling every process, is the same signal; a
    later second one kills at once). Returns the first failure's exit code, else
    PREEMPTED_EXIT_CODE when a worker was preempted, else 0."""

    def forward(signum):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    code, preempted = 0, False
    with StopRequest(on_signal=forward):
        pending = set(range(len(procs)))
        while pending:
            for k in sorted(pending):
                try:
                    procs[k].wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                pending.discard(k)
                rc = procs[k].returncode
                if rc == PREEMPTED_EXIT_CODE:
                    preempted = True
                elif rc != 0 and code == 0:
                    code = rc
                    print(f"error: worker process {k} exited with {rc}; stopping the others", file=sys.stderr)
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
    return code or (PREEMPTED_EXIT_CODE if preempted else 0)


def launch_process_per_gpu(args, argv) -> int:
    """Start one worker per GPU (see the module docstring); wait; the first failure stops all.
    The chief's console (progress, scores, its summary line) streams through; the other
    workers' standard output is dropped (their logs go to standard error)."""
    try:
        envs = process_per_gpu_environments(args.gpus, cpu=args.cpu)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    child_argv = _strip(_strip(_strip(argv, "--process-per-gpu", False), "--gpus", True), "--cpu", False)
    command = [sys.executable, os.path.abspath(__file__), *child_argv]
    chief = [json.loads(env["TF_CONFIG"])["task"]["index"] == 0 for env in envs]
    sys.stdout.flush()
    procs = [subprocess.Popen(command, env=env, stdout=None if is_chief else subprocess.DEVNULL)
             for env, is_chief in zip(envs, chief)]
    print(f"started {len(procs)} worker processes ({'CPU' if args.cpu else 'GPUs ' + args.gpus}), "
          f"pids {[p.pid for p in procs]}", file=sys.stderr)
    return supervise(procs)


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
        from utils.distribute import make_strategy, strategy_name

        s = make_strategy(cpu_replicas=args.cpu_replicas)
        logging.info("%s with %d replicas", strategy_name(s), s.num_replicas_in_sync)
        return s

    return run_cli(args, strategy)


if __name__ == "__main__":
    sys.exit(main())
