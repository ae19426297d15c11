"""SIGTERM and SIGINT as a request to stop cleanly: the rule the training loop and the launcher share.

Schedulers and spot VMs (SLURM, Kubernetes, preemptible clouds) send SIGTERM, wait a grace
period, then kill. A training process that receives SIGTERM or SIGINT does not die: it notes the
request, finishes the ``tf.function`` call it is in, saves a checkpoint on every worker (the
decision to stop is all-reduced, so all workers save the same step) and exits with
:data:`PREEMPTED_EXIT_CODE`. Running the same command again resumes from that checkpoint.

The request holds from the moment the command starts (``main.py``'s runner installs it before
TensorFlow loads): a signal during start-up (imports, reading annotations, building the model,
restoring) is kept, and the training loop, before its first step, stops every worker without
training or saving anything (exit 75; the newest checkpoint is still where the run resumes).

A *second* signal kills at once (the default action of that signal), for a user who does not
want to wait for the save. Signals that arrive within :data:`SAME_SIGNAL_WINDOW` seconds of the
first count as the first: a scheduler that signals every process of a job and a launcher that
forwards the signal to its workers (``distribute_main.py --process-per-gpu``) deliver it twice
within milliseconds, and that must not turn one preemption into a kill during the save.

This module does not import TensorFlow (the launcher uses it before any worker starts).
"""

from __future__ import annotations

import signal
import time
from typing import Callable, Dict, Optional

PREEMPTED_EXIT_CODE = 75          # sysexits EX_TEMPFAIL: "try again": rerun the command to resume
SAME_SIGNAL_WINDOW = 1.0          # seconds: repeats of a signal within this count as one
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs handlers for SIGTERM and SIGINT while active (a context manager).

    ``requested``: a stop was asked for; ``signal_name``: which signal. ``on_signal(signum)``
    (optional) is called for every signal that counts (the first, and a second one before the
    default action runs), e.g. to forward it to child processes.
    """

    def __init__(self, on_signal: Optional[Callable[[int], None]] = None, clock=time.monotonic):
        self.on_signal = on_signal
        self.clock = clock
        self.requested = False
        self.signal_name = ""
        self._first_at: Optional[float] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = self.clock()
        if self._first_at is None:
            self._first_at = now
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            if self.on_signal is not None:
                self.on_signal(signum)
            return
        if now - self._first_at < SAME_SIGNAL_WINDOW:
            return                                   # the same preemption, delivered twice
        # A second signal: do what it would have done without us, now.
        if self.on_signal is not None:
            self.on_signal(signum)
        self.__exit__()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
