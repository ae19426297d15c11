"""The one training loop, used by ``main.py`` (one device) and ``distribute_main.py`` (a strategy).

Why a custom ``tf.GradientTape`` loop rather than ``Model.fit``: SPM's loss needs the targets dict
and weights, the loss must be normalised by the *global* batch so that it is identical on one
device and on N replicas, gradient clipping must act on the all-reduced gradient (Keras 3 clips
per replica), a non-finite update must be skipped on every replica without touching the
optimizer, and resume must restore model, optimizer, epoch, step, best score and the position in
the data from ``tf.train.CheckpointManager`` in the middle of an epoch, on every worker. The
same lines run under the default strategy, MirroredStrategy and MultiWorkerMirroredStrategy.

What each step guarantees on any number of replicas:

* **Two all-reduces.** Each replica's gradient is all-reduced once by the step itself (the
  optimizer's own all-reduce is switched off: :func:`gradients_arrive_reduced`), and the loss
  terms plus the workers' stop and save requests travel in one all-reduce of a small vector.
  With ``--grad-clip-norm`` the all-reduced gradient is clipped by its global norm (in
  loss-scaled units).
* **One finite decision.** Finiteness is read off the all-reduced gradient and losses, so every
  replica sees the same answer. A non-finite step's update is skipped on every replica: the
  weights, the optimizer's slots and its iteration count stay as they were (with
  ``--mixed-precision float16`` Keras' ``LossScaleOptimizer`` skips it and halves the loss
  scale). Skipped steps are counted (``skipped_updates`` in TensorBoard and ``history.json``,
  a warning naming them); ``--max-bad-steps`` consecutive ones stop the run with
  :class:`NonFiniteLossError` naming them (exit code 3).
* **Several steps per call.** ``steps_per_call`` steps run inside one ``tf.function`` call
  (a ``tf.while_loop`` over the distributed iterator); losses are summed on the device and read
  once per call. Progress, TensorBoard, checkpoints and stop requests work at call boundaries;
  calls end at epoch and checkpoint boundaries.
* **Checkpoints from finite weights only**, written by every worker together: at epoch ends
  (before the evaluation, which a resume runs again if it was cut short), every
  ``checkpoint_every_steps`` steps, every ``checkpoint_every_minutes`` minutes and on SIGTERM /
  SIGINT. The decision is one decision: each worker's request is all-reduced in the step.
* **Preemption.** SIGTERM or SIGINT (``utils/preemption.py``): every worker saves a checkpoint
  at the next call boundary and the run returns with ``"preempted": true``; ``main.py`` exits
  with code 75. The same command resumes. A second signal kills at once. A signal during
  start-up (``main.py`` holds the request from its first lines) stops every worker before the
  first step, with nothing to save.
* **Resume on every worker.** Every worker restores the newest checkpoint of
  ``run_dir/checkpoints`` (the chief's; the run directory must be on storage all workers see),
  the workers' steps are compared and a disagreement stops the run; only the chief writes
  there, the others to one scratch folder each (:func:`worker_scratch_dir`, wiped at start, one
  checkpoint kept). The data stream continues where it was (``dataset/pipeline.py``, "The data
  position"). A checkpoint from another *global* batch is refused naming both; another replica
  count with the same global batch continues with a warning. A config field that changes what
  the checkpoint means (``config.resume_differences``) is refused naming both values.
* **Inputs checked before step 1.** The training split and, on the chief, the validation split
  are read and one picture of each decoded before the first step; an evaluation that cannot use
  more than 1% of its pictures is an error naming the folder. An error on one worker stops every
  worker (the error flag travels in an all-reduce the others wait in).
* **Evaluation once.** The chief evaluates (the model in cross-replica context, one device); the
  other workers wait at the next collective and receive the score by an all-reduce.

Run directory layout (everything a tool needs to rebuild and load the model)::

    run_dir/config.json           resolved config (written once the resume checks have passed)
    run_dir/resumes.jsonl         one line per resume: step and the config fields that changed
    run_dir/checkpoints/          tf.train.Checkpoint: model, optimizer, epoch, step, best score,
                                  data seed, pending evaluation, replicas and per-replica batch
    run_dir/best.weights.h5       model weights at the best validation score (written atomically)
    run_dir/final.weights.h5      model weights at the end of training (written atomically)
    run_dir/logs/                 TensorBoard: losses, learning rate, score, prediction images
    run_dir/history.json          per-epoch losses, scores and skipped updates
    run_dir/predictions.png       predictions on validation images at the end
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import keras
import tensorflow as tf

from config import Config, load_config, resume_differences
from dataset.coco import resolve_skeleton
from dataset.pipeline import InputPipeline, input_error_message, on_device
from nets.losses import spm_loss
from nets.spm_model import build_spm_model, load_backbone_weights
from utils.evaluation import Evaluator, save_prediction_picture
from utils.preemption import StopRequest

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
FINAL_WEIGHTS = "final.weights.h5"
PICTURE = "predictions.png"


MAX_SKIPPED_EVAL_FRACTION = 0.01     # an evaluation that cannot use more of its pictures stops the run


class NonFiniteLossError(RuntimeError):
    """Training produced ``max_bad_steps`` consecutive non-finite steps, or non-finite weights;
    the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- schedule

@keras.saving.register_keras_serializable(package="spm")
class SpmLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then the step schedule (x factor at each boundary epoch) or cosine decay.

    The rate is a pure function of the optimizer's step, so a resumed run continues on exactly
    the same schedule.
    """

    def __init__(self, base_lr: float, steps_per_epoch: int, total_steps: int, kind: str = "step",
                 decay_epochs=(), decay_factor: float = 0.1, warmup_steps: int = 0):
        self.base_lr = float(base_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.decay_epochs = tuple(int(e) for e in decay_epochs)
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.kind == "cosine":
            progress = tf.clip_by_value(
                (step - self.warmup_steps) / max(1.0, self.total_steps - self.warmup_steps), 0.0, 1.0)
            lr = 0.5 * self.base_lr * (1.0 + tf.cos(math.pi * progress))
        else:
            boundaries = tf.constant([e * self.steps_per_epoch for e in self.decay_epochs] or [0],
                                     tf.float32)
            passed = tf.reduce_sum(tf.cast(step >= boundaries, tf.float32)) if self.decay_epochs else 0.0
            lr = self.base_lr * tf.pow(self.decay_factor, passed)
        if self.warmup_steps > 0:
            lr = lr * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def get_config(self):
        return dict(base_lr=self.base_lr, steps_per_epoch=self.steps_per_epoch,
                    total_steps=self.total_steps, kind=self.kind, decay_epochs=self.decay_epochs,
                    decay_factor=self.decay_factor, warmup_steps=self.warmup_steps)


def learning_rate(cfg: Config, global_batch: int) -> float:
    """The base rate used: ``lr``, or with ``lr_base_batch`` N > 0 the linear rule
    ``lr x global batch / N`` (Goyal et al. 2017; mmpose's ``auto_scale_lr``)."""
    t = cfg.train
    return t.lr * global_batch / t.lr_base_batch if t.lr_base_batch > 0 else t.lr


def build_optimizer(cfg: Config, steps_per_epoch: int, global_batch: int = 0) -> keras.optimizers.Optimizer:
    """Adam (AdamW when weight_decay > 0) or SGD with momentum 0.9 on the configured schedule;
    dynamic loss scaling for float16. ``global_batch`` (default: ``batch_size``) scales the rate
    when ``lr_base_batch`` is set."""
    t = cfg.train
    schedule = SpmLearningRate(learning_rate(cfg, global_batch or cfg.data.batch_size), steps_per_epoch, t.epochs * steps_per_epoch, t.lr_schedule,
                               t.lr_decay_epochs, t.lr_decay_factor, t.warmup_steps)
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9,
                                   weight_decay=t.weight_decay or None)
    elif t.weight_decay > 0:
        opt = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=t.weight_decay)
    else:
        opt = keras.optimizers.Adam(learning_rate=schedule)
    if t.mixed_precision == "float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def gradients_arrive_reduced(optimizer: keras.optimizers.Optimizer) -> None:
    """Switch off the optimizer's own all-reduce of the gradients: the training step all-reduces
    them once itself (it needs the sum for the clipping norm and the finite decision), and a
    second all-reduce would double the traffic and sum the summed gradients again. For a
    ``LossScaleOptimizer`` this is the inner optimizer (whose finite check, reading replica 0,
    is then right: the gradients it reads are the all-reduced ones)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not callable(getattr(inner, "_all_reduce_sum_gradients", None)):
        raise RuntimeError(f"{type(inner).__name__} has no _all_reduce_sum_gradients (Keras "
                           f"{keras.__version__}): utils/training.py all-reduces the gradients itself "
                           f"and must switch the optimizer's all-reduce off; pin keras to 3.15")
    inner._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)


def save_weights_atomically(model: keras.Model, path: str) -> str:
    """``model.save_weights(path)`` through a temporary file and a rename, so that a kill during
    the write never leaves a truncated file where the tools look."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp.{os.getpid()}.{name}")      # keeps the .weights.h5 ending
    try:
        model.save_weights(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def worker_scratch_dir(run_dir: str, task_id: int) -> str:
    """The one scratch folder of a non-chief worker's checkpoints (every worker takes part in a
    save; only the chief's goes to the run directory): ``<tmp>/spm_worker_scratch/<run>/worker<k>``,
    ``<run>`` a hash of the run directory's absolute path. Wiped when the worker starts."""
    key = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "spm_worker_scratch", key, f"worker{task_id}")


def set_precision_policy(cfg: Config) -> None:
    """Set the global Keras dtype policy before the model is built."""
    policy = {"": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
    keras.mixed_precision.set_global_policy(policy[cfg.train.mixed_precision])


# ----------------------------------------------------------------------------- helpers

def worker_task(strategy: tf.distribute.Strategy):
    """``(is_chief, task_id)`` of this process: the chief writes checkpoints, summaries and
    pictures."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True, 0
    spec = resolver.cluster_spec().as_dict()
    if not spec:
        return True, 0
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if "chief" in spec:
        return task_type == "chief", task_id
    return task_type == "worker" and task_id == 0, task_id



class _Progress:
    """A Keras progress bar with the loss components, or nothing on non-chief workers."""

    def __init__(self, steps: int, epoch: int, epochs: int, enabled: bool):
        self.bar = None
        if enabled:
            print(f"Epoch {epoch + 1}/{epochs}", flush=True)
            # A live bar on a terminal; one line per epoch in logs and CI.
            self.bar = keras.utils.Progbar(steps, stateful_metrics=["lr", "loss_scale"],
                                           verbose=1 if sys.stdout.isatty() else 2)

    def update(self, step_in_epoch: int, values: Dict[str, float]):
        if self.bar is not None:
            self.bar.update(step_in_epoch, values=list(values.items()))


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """Builds model, optimizer, data and checkpoints under ``strategy`` and trains.

    Args:
        cfg: the resolved config.
        strategy: a tf.distribute strategy; None = the default (one device).
        run_dir: where checkpoints, logs and pictures go; resumes from it when it holds a run.
        evaluate_fn: ``(model, cfg) -> dict`` with at least ``score``; None = the default
            evaluation (utils.evaluation.Evaluator on the validation split).
        pipeline: the training input (``dataset.pipeline.InputPipeline``: ``len()``,
            ``dataset(input_context=..., repeat=True, start_step=..., seed=...)`` yielding
            per-replica batches, ``skipped``); None = the configured training split.
        gradient_hook: ``(grads, step) -> grads``, called in each replica on its local gradients
            before anything else sees them (tests inject non-finite gradients with it).
    """

    def __init__(self, cfg: Config, strategy: Optional[tf.distribute.Strategy] = None,
                 run_dir: Optional[str] = None,
                 evaluate_fn: Optional[Callable[[keras.Model, Config], Dict[str, Any]]] = None,
                 pipeline=None, gradient_hook: Optional[Callable[[Sequence[tf.Tensor], tf.Tensor], list]] = None):
        cfg = resolve_skeleton(cfg)     # --skeleton auto / FILE.json: settled before anything is built
        self.cfg = cfg
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.local_replicas = len(self.strategy.extended.worker_devices) if self.replicas > 1 else 1
        self.global_batch = cfg.data.batch_size * self.replicas
        self.is_chief, self.task_id = worker_task(self.strategy)
        self.run_dir = run_dir or cfg.train.run_dir or os.path.join("runs", cfg.preset)
        self.evaluate_fn = evaluate_fn
        self.gradient_hook = gradient_hook
        self._evaluator: Optional[Evaluator] = None     # the default one (no evaluate_fn), on the chief
        self._run_ckpt_dir = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
        latest = tf.train.latest_checkpoint(self._run_ckpt_dir)
        self.config_changes = self._check_run_dir_config() if latest else []
        self.loss_keys = ("total", "root", "disp") + (("joints",) if cfg.model.joint_heatmaps else ())

        self.pipeline = pipeline if pipeline is not None else InputPipeline(cfg, "train")
        self.num_examples = len(self.pipeline)
        if not cfg.train.steps_per_epoch and self.num_examples < self.global_batch:
            raise ValueError(f"the training set has {self.num_examples} images, fewer than one "
                             f"global batch of {self.global_batch}")
        self.steps_per_epoch = cfg.train.steps_per_epoch or self.num_examples // self.global_batch
        self._check_inputs()

        set_precision_policy(cfg)
        if cfg.data.deterministic:
            keras.utils.set_random_seed(cfg.data.seed)      # the initial weights too
        with self.strategy.scope():
            self.model = build_spm_model(cfg)
            self.optimizer = build_optimizer(cfg, self.steps_per_epoch, self.global_batch)
            # Keras 3 under a strategy: build optimizer slots in scope before the first step.
            self.optimizer.build(self.model.trainable_variables)
            gradients_arrive_reduced(self.optimizer)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.best_score = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_score")
            # What the data stream and the step-based schedule depend on, checked at resume.
            self._run_replicas = tf.Variable(self.replicas, dtype=tf.int64, trainable=False, name="replicas")
            self._run_batch = tf.Variable(cfg.data.batch_size, dtype=tf.int64, trainable=False,
                                          name="batch_size")
            self.data_seed = tf.Variable(-1, dtype=tf.int64, trainable=False, name="data_seed")
            # The epoch-end checkpoint is written before the evaluation: a resume runs it again.
            self.eval_pending = tf.Variable(0, dtype=tf.int64, trainable=False, name="eval_pending")
            self._bad_run = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_run")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              epoch=self.epoch, step=self.step,
                                              best_score=self.best_score, replicas=self._run_replicas,
                                              batch_size=self._run_batch, data_seed=self.data_seed,
                                              eval_pending=self.eval_pending)
        # Under MultiWorkerMirroredStrategy every worker must take part in a save; only the
        # chief's goes to the run directory, the others' to one scratch folder each (TF's
        # pattern), wiped at start. Every worker *restores* from the run directory.
        if self.is_chief:
            self._ckpt_dir = self._run_ckpt_dir
        else:
            self._ckpt_dir = worker_scratch_dir(self.run_dir, self.task_id)
            shutil.rmtree(self._ckpt_dir, ignore_errors=True)
            os.makedirs(self._ckpt_dir, exist_ok=True)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self._ckpt_dir,
                                                  max_to_keep=cfg.train.max_checkpoints if self.is_chief else 1)
        self.resumed_from = self._restore_or_initialise(latest)
        if self.resumed_from:
            self._best_score_from_history()
        if self.is_chief:
            self.cfg.save(self.run_dir)                  # only now: every check has passed
            if self.resumed_from:
                self._record_resume()
        if cfg.train.lr_base_batch and self.is_chief:
            log.info("learning rate %.4g = lr %.4g x global batch %d / lr_base_batch %d",
                     learning_rate(cfg, self.global_batch), cfg.train.lr, self.global_batch,
                     cfg.train.lr_base_batch)
        # Each input pipeline (one per worker) takes its replicas' share of every global batch
        # and starts where the restored step left the stream (nothing is read to get there).
        start_step, seed = int(self.step.numpy()), int(self.data_seed.numpy())
        self.dist_dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: self.pipeline.dataset(input_context=ctx, repeat=True, start_step=start_step, seed=seed))
        # Flushed every 10 s (TensorBoard's default is 2 minutes): a live run shows live numbers.
        self.writer = (tf.summary.create_file_writer(os.path.join(self.run_dir, "logs"), flush_millis=10_000)
                       if self.is_chief else tf.summary.create_noop_writer())
        self._train_call = self._make_train_call()

    # ------------------------------------------------------------------ setup

    def _check_run_dir_config(self) -> List[tuple]:
        """Before resuming: refuse a run directory whose config differs in a field that changes
        what its checkpoint means, naming each field with both values; return the fields that
        may change (recorded once the run starts). Writes nothing."""
        path = os.path.join(self.run_dir, "config.json")
        if not os.path.exists(path):
            return []
        refused, allowed = resume_differences(load_config(path), self.cfg)
        if refused:
            what = "; ".join(f"{name}: {old!r} in the run, {new!r} now" for name, old, new in refused)
            raise ValueError(f"{self.run_dir} holds a run with other settings ({what}); resume with "
                             f"the run's own (--config {self.run_dir}), or start a new --run-dir "
                             f"(--finetune {os.path.join(self.run_dir, BEST_WEIGHTS)} keeps the weights)")
        for name, old, new in allowed:
            log.info("resume: %s changed from %r to %r", name, old, new)
        return allowed

    def _record_resume(self) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": int(self.step.numpy()),
                 "replicas": self.replicas, "batch_size": self.cfg.data.batch_size,
                 "changed": {name: [old, new] for name, old, new in self.config_changes}}
        with open(os.path.join(self.run_dir, "resumes.jsonl"), "a") as f:
            f.write(json.dumps(entry, default=list) + "\n")

    def _check_inputs(self) -> None:
        """Read the validation split and decode one picture of each split before the first step
        (a wrong --val-json or --val-images otherwise shows at the first evaluation, epochs
        later); an error anywhere stops every worker."""
        error = None
        try:
            check = getattr(self.pipeline, "check_readable", None)
            if check is not None:
                check()
            if self.is_chief and self.evaluate_fn is None:
                self._evaluator = Evaluator(self.cfg, flip=self.cfg.train.eval_flip,
                                            max_skipped_fraction=MAX_SKIPPED_EVAL_FRACTION)
                self._evaluator.check_readable()
        except (ValueError, FileNotFoundError) as e:
            error = str(e)
        self._raise_on_every_worker(error, "checking the input")

    def _raise_on_every_worker(self, error: Optional[str], what: str) -> None:
        """Raise ``error`` (None: no error here) on every worker if any worker has one: the flag
        travels in an all-reduce, so workers waiting in a collective are released too."""
        if self._on_any_worker(error is not None):
            raise ValueError(error or f"another worker failed while {what} (see its log); stopping")

    def _on_any_worker(self, flag: bool) -> bool:
        """True on every worker when ``flag`` is true on any (every worker must call it)."""
        if self.replicas == 1:
            return bool(flag)
        return self._sum_over_replicas([1.0 / self.local_replicas if flag else 0.0])[0] > 0.5

    def _restore_or_initialise(self, latest: Optional[str]) -> Optional[str]:
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            saved = (int(self._run_replicas.numpy()), int(self._run_batch.numpy()))
            if saved[0] * saved[1] != self.global_batch:
                raise ValueError(
                    f"{latest} was trained with a global batch of {saved[0] * saved[1]} ({saved[0]} "
                    f"replica(s) x batch {saved[1]}); this run has {self.global_batch} ({self.replicas} "
                    f"replica(s) x batch {self.cfg.data.batch_size}). The epoch length, the step-based "
                    f"schedule and the data position depend on the global batch: choose --batch-size "
                    f"{max(1, saved[0] * saved[1] // self.replicas)} for {self.replicas} replica(s) "
                    f"if it divides, or start a new --run-dir (--finetune "
                    f"{os.path.join(self.run_dir, BEST_WEIGHTS)} keeps the weights)")
            if saved != (self.replicas, self.cfg.data.batch_size) and self.is_chief:
                log.warning("resuming %s with %d replica(s) x batch %d instead of %d x %d: the same global "
                            "batch, schedule and epoch; the global batches hold the same pictures, split "
                            "differently among replicas (BatchNorm statistics now see %d pictures per "
                            "replica, and the batches' augmentation differs)", latest, self.replicas,
                            self.cfg.data.batch_size, saved[0], saved[1], self.cfg.data.batch_size)
            self._run_replicas.assign(self.replicas)
            self._run_batch.assign(self.cfg.data.batch_size)
            if int(self.data_seed.numpy()) < 0:           # a checkpoint from before the data position
                self.data_seed.assign(self._agreed_seed())
            log.info("resumed from %s at epoch %d, step %d", latest, int(self.epoch.numpy()),
                     int(self.step.numpy()))
        else:
            if self.cfg.train.finetune:
                if not os.path.isfile(self.cfg.train.finetune):
                    raise FileNotFoundError(f"--finetune {self.cfg.train.finetune}: no such weights file")
                self.model.load_weights(self.cfg.train.finetune)
                log.info("fine-tuning from %s", self.cfg.train.finetune)
            elif self.cfg.model.backbone_weights:
                load_backbone_weights(self.model, self.cfg.model.backbone_weights)
                log.info("backbone weights from %s", self.cfg.model.backbone_weights)
            self.data_seed.assign(self._agreed_seed())
        self._check_workers_agree()
        return latest

    def _agreed_seed(self) -> int:
        """The data seed of a new run, the same on every worker: ``cfg.data.seed`` with
        --deterministic, otherwise the chief's pipeline's random one."""
        if self.cfg.data.deterministic:
            return int(self.cfg.data.seed)
        return int(round(self._from_chief([int(getattr(self.pipeline, "seed", 0))])[0]))

    def _from_chief(self, values: Sequence[float]) -> List[float]:
        """The chief's ``values`` on every worker (every worker must call it): in a sum over
        all replicas the chief's replicas carry ``value / (its replicas)``, the others 0."""
        if self.replicas == 1:
            return [float(v) for v in values]
        return self._sum_over_replicas([float(v) / self.local_replicas if self.is_chief else 0.0 for v in values])

    def _sum_over_replicas(self, values: Sequence[float]) -> List[float]:
        """The sums of ``values`` over all replicas of all workers (every worker must call it)."""
        values = [float(v) for v in values]

        def fn():
            # The constant is made in each replica (one captured eager tensor is summed once).
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(values, tf.float64))

        return [float(v) for v in self.strategy.experimental_local_results(self.strategy.run(fn))[0].numpy()]

    def _check_workers_agree(self):
        """Every worker must have restored the same step (a worker that cannot see the chief's
        checkpoints would start from 0 and the all-reduce would mix two models): the variance
        of the replicas' steps, from two sums, must be zero."""
        if self.replicas == 1:
            return
        step = float(self.step.numpy())
        total, squares = self._sum_over_replicas([step, step * step])
        mean, mean_square = total / self.replicas, squares / self.replicas
        if abs(mean_square - mean * mean) > 1e-6 * max(1.0, mean * mean):
            raise ValueError(f"the workers restored different steps (this worker: {int(step)}, mean over "
                             f"workers: {mean:g}): every worker restores {self._run_ckpt_dir}, so the "
                             f"run directory must be on storage that all workers see")

    def _make_train_call(self):
        cfg, model, opt, strategy = self.cfg, self.model, self.optimizer, self.strategy
        global_batch = self.global_batch
        clip = cfg.train.grad_clip_norm
        loss_scaling = isinstance(opt, keras.optimizers.LossScaleOptimizer)
        hook = self.gradient_hook
        variables = model.trainable_variables
        keys = self.loss_keys
        statistics = model.non_trainable_variables       # BatchNorm's moving means and variances

        def replica_step(images, labels, step, requests):
            # The host sends uint8 pictures and padded points; colour and targets are made here.
            images, targets = on_device(images, labels, cfg)
            before = [tf.identity(v) for v in statistics]
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                losses = spm_loss(targets, outputs, cfg.loss, global_batch)
                scaled = opt.scale_loss(losses["total"]) if loss_scaling else losses["total"]
            grads = tape.gradient(scaled, variables)
            grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
            if hook is not None:
                grads = hook(grads, step)
            ctx = tf.distribute.get_replica_context()
            # The only all-reduces of the step: the gradient, and the loss terms with the
            # workers' requests (the optimizer's own all-reduce is off).
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            scalars = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                     tf.concat([tf.stack([losses[k] for k in keys]), requests], 0))
            # Read off all-reduced values: the same decision on every replica.
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]
                                   + [tf.reduce_all(tf.math.is_finite(scalars))])
            # A skipped step leaves BatchNorm's statistics as they were too (the forward pass
            # moved them, maybe to inf), as BatchNorm writes them: per replica.
            for v, old in zip(statistics, before):
                v.assign(tf.where(finite, v, old))
            if clip > 0:
                limit = clip * (opt.dynamic_scale if loss_scaling else 1.0)     # loss-scaled units
                grads, _ = tf.clip_by_global_norm(grads, limit)
            return scalars, finite, grads

        def apply(grads):
            opt.apply_gradients(zip(grads, variables))

        def apply_branch(grads):
            strategy.run(apply, args=(grads,))
            return tf.constant(True)

        step_fn = tf.function(replica_step, jit_compile=True) if cfg.train.xla else replica_step
        n = len(keys)

        # Traced as written (no AutoGraph: converting every function the step calls cost about a
        # quarter of the first call); the loop is an explicit tf.while_loop, each branch a tf.cond.
        @tf.function(autograph=False)
        def train_call(iterator, num_steps, requests):
            """``num_steps`` steps: summed losses, the all-reduced requests of the last step, the
            steps whose update was skipped (-1 for the others) and the consecutive bad steps."""

            def one_step(i, sums, scalars, bad_steps):
                images, labels = iterator.get_next()
                step = self.step.assign_add(1)
                scalars, finite, grads = strategy.run(step_fn, args=(images, labels, step, requests))
                scalars = strategy.experimental_local_results(scalars)[0]
                finite = strategy.experimental_local_results(finite)[0]
                if loss_scaling:
                    strategy.run(apply, args=(grads,))       # LossScaleOptimizer skips it itself
                else:
                    tf.cond(finite, lambda: apply_branch(grads), lambda: tf.constant(False))
                self._bad_run.assign(tf.where(finite, tf.constant(0, tf.int64), self._bad_run + 1))
                bad_steps = bad_steps.write(tf.cast(i, tf.int32), tf.where(finite, tf.constant(-1, tf.int64), step))
                return i + 1, sums + scalars[:n], scalars, bad_steps

            _, sums, scalars, bad_steps = tf.while_loop(
                lambda i, *_: i < num_steps, one_step,
                (tf.constant(0, tf.int64), tf.zeros([n], tf.float32), tf.zeros([n + 2], tf.float32),
                 tf.TensorArray(tf.int64, size=tf.cast(num_steps, tf.int32))))
            out = {"sums": sums, "requests": scalars[n:], "bad_steps": bad_steps.stack(),
                   "bad_run": self._bad_run.read_value(), "step": self.step.read_value(),
                   "lr": tf.cast(opt.learning_rate, tf.float32)}
            if loss_scaling:
                out["loss_scale"] = tf.cast(opt.dynamic_scale, tf.float32)
            return out

        return train_call

    # ------------------------------------------------------------------ loop

    def _weights_finite(self) -> bool:
        return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.model.weights]).numpy())

    def save_checkpoint(self):
        step = int(self.step.numpy())
        if not self._weights_finite():
            raise NonFiniteLossError(f"non-finite weights at step {step}; not saved, the last good "
                                     f"checkpoint is kept in {self._run_ckpt_dir}")
        path = self.manager.save(checkpoint_number=step)
        if self.is_chief:
            log.info("checkpoint %s", path)
        return path

    def run_steps(self, iterator, num_steps: int, stop: bool = False, save: bool = False) -> Dict[str, Any]:
        """``num_steps`` training steps in one call (one host sync); the mean losses.

        ``stop`` / ``save``: this worker's requests; the result's ``stop`` / ``save`` are true
        when any worker asked (the same answer on every worker). ``skipped``: the steps whose
        update was skipped (non-finite). Raises NonFiniteLossError when ``max_bad_steps``
        consecutive steps were non-finite, naming them.
        """
        requests = tf.constant([float(stop), float(save)], tf.float32)
        try:
            out = {k: v.numpy() for k, v in
                   self._train_call(iterator, tf.constant(num_steps, tf.int64), requests).items()}
        except tf.errors.OpError as e:
            message = input_error_message(e)          # e.g. a wrong image folder: one clear line
            if message is None:
                raise
            raise ValueError(message) from None
        step = int(out["step"])
        skipped = [int(s) for s in out["bad_steps"] if s >= 0]
        bad_run = int(out["bad_run"])
        result: Dict[str, Any] = {k: float(v) / num_steps for k, v in zip(self.loss_keys, out["sums"])}
        if skipped:
            if self.is_chief:
                log.warning("skipped the update of step%s %s (non-finite gradient or loss; %d in a row)",
                            "s" if len(skipped) > 1 else "", ", ".join(map(str, skipped)), bad_run)
            if bad_run >= self.cfg.train.max_bad_steps:
                first = step - bad_run + 1
                raise NonFiniteLossError(
                    f"{bad_run} consecutive non-finite steps, {first} to {step} (epoch "
                    f"{first // self.steps_per_epoch + 1}; --max-bad-steps {self.cfg.train.max_bad_steps}), "
                    f"every update skipped; the last good checkpoint is kept in {self._run_ckpt_dir}; "
                    f"try a lower --lr or --grad-clip-norm")
        result.update(lr=float(out["lr"]), step=step, skipped=skipped,
                      stop=bool(out["requests"][0] > 0), save=bool(out["requests"][1] > 0))
        if "loss_scale" in out:
            result["loss_scale"] = float(out["loss_scale"])
        return result

    def _steps_in_next_call(self, step: int, end_of_epoch: int) -> int:
        """Up to ``steps_per_call``, ending at the epoch end and at checkpoint boundaries."""
        n = min(self.cfg.train.steps_per_call, end_of_epoch - step)
        every = self.cfg.train.checkpoint_every_steps
        if every:
            n = min(n, every - step % every)
        return n

    def fit(self, stop: Optional[StopRequest] = None) -> Dict[str, Any]:
        """Train to ``cfg.train.epochs`` (or until SIGTERM / SIGINT: then ``"preempted": true``
        after a checkpoint on every worker); the summary dict. ``stop``: a StopRequest already
        active (``main.py``'s, installed before start-up); None: one for the duration of this call.
        A stop requested before the first step (during start-up) returns at once, on every worker,
        with nothing trained and nothing saved."""
        if stop is not None:
            return self._fit(stop)
        with StopRequest() as own:
            return self._fit(own)

    def _fit(self, stop: StopRequest) -> Dict[str, Any]:
        cfg = self.cfg
        start = time.time()
        epochs = cfg.train.epochs
        history = self._load_history()
        skipped_updates = int(history[-1].get("skipped_updates", 0)) if history else 0
        if self._on_any_worker(stop.requested):       # asked during start-up, on any worker
            if self.is_chief:
                print(f"{stop.signal_name or 'a stop request'} during start-up (on this or another worker): "
                      f"stopping before the first step; nothing to save (the run resumes from "
                      f"{self.resumed_from or 'its start'})", flush=True)
            return self._summary(start, history[-1] if history else {}, skipped_updates, preempted=True)
        epoch = int(self.epoch.numpy())
        done = bool(history) and history[-1]["epoch"] == epoch and "score" in history[-1]
        # The chief's history decides, for every worker.
        pending = self._from_chief([float(bool(int(self.eval_pending.numpy()) and not done))])[0] > 0.5
        if pending:
            # The run stopped during the evaluation that follows its last epoch-end checkpoint.
            if not history or history[-1]["epoch"] != epoch:
                history.append({"epoch": epoch, "step": int(self.step.numpy())})
            self._evaluate_into(history[-1], final=epoch == epochs)
            self.eval_pending.assign(0)
            self._save_history(history)
        last_eval: Dict[str, Any] = history[-1] if history else {}
        data_iter = iter(self.dist_dataset)
        log_every = max(1, cfg.train.log_every_steps)
        minutes, every = cfg.train.checkpoint_every_minutes, cfg.train.checkpoint_every_steps
        last_save = time.monotonic()
        preempted = False
        while int(self.epoch.numpy()) < epochs and not preempted:
            epoch = int(self.epoch.numpy())
            step = int(self.step.numpy())
            end_of_epoch = (epoch + 1) * self.steps_per_epoch
            progress = _Progress(self.steps_per_epoch, epoch, epochs, self.is_chief)
            sums: Dict[str, float] = {}
            n = 0
            while step < end_of_epoch:
                num = self._steps_in_next_call(step, end_of_epoch)
                due = bool(minutes) and time.monotonic() - last_save >= 60.0 * minutes
                losses = self.run_steps(data_iter, num, stop=stop.requested, save=due)
                logged, step = step, losses.pop("step")
                skipped_updates += len(losses.pop("skipped"))
                for k in self.loss_keys:
                    sums[k] = sums.get(k, 0.0) + losses[k] * num
                n += num
                progress.update(step - epoch * self.steps_per_epoch,
                                {k: v for k, v in losses.items() if k not in ("stop", "save")})
                if step // log_every > logged // log_every:
                    with self.writer.as_default(step=step):
                        for k in self.loss_keys:
                            tf.summary.scalar(f"loss/{k}", losses[k])
                        tf.summary.scalar("learning_rate", losses["lr"])
                        tf.summary.scalar("skipped_updates", skipped_updates)
                        if "loss_scale" in losses:
                            tf.summary.scalar("loss_scale", losses["loss_scale"])
                if losses["stop"]:
                    preempted = True
                    if self.is_chief:
                        print(f"\n{stop.signal_name or 'a stop request'} (on this or another worker): "
                              f"saving step {step} and stopping", flush=True)
                if step < end_of_epoch and (losses["stop"] or losses["save"] or (every and step % every == 0)):
                    self.save_checkpoint()
                    last_save = time.monotonic()
                if preempted:
                    break
            if step < end_of_epoch:
                break
            # Epoch end: the record and the checkpoint first, then the evaluation (a resume
            # repeats an evaluation the run did not finish: eval_pending).
            self.epoch.assign(epoch + 1)
            record = {"epoch": epoch + 1, "step": step,
                      **{f"loss_{k}": v / max(n, 1) for k, v in sums.items()},
                      "skipped_images": self.pipeline.skipped.count, "skipped_updates": skipped_updates}
            if self.pipeline.skipped.count and self.is_chief:
                log.warning("%s", self.pipeline.skipped.summary())
            eval_due = (epoch + 1) % max(1, cfg.train.eval_every_epochs) == 0 or epoch + 1 == epochs
            history.append(record)
            self._save_history(history)
            self.eval_pending.assign(int(eval_due))
            self.save_checkpoint()
            last_save = time.monotonic()
            # ``preempted`` is the all-reduced decision (a local flag could differ between
            # workers); a stop asked in the epoch's last call leaves the evaluation to the resume.
            if eval_due and not preempted:
                last_eval = self._evaluate_into(record, final=epoch + 1 == epochs)
                self.eval_pending.assign(0)
                self._save_history(history)
        # The iterator's threads may call into Python: end them before returning.
        del data_iter
        if not preempted and self.is_chief:
            save_weights_atomically(self.model, os.path.join(self.run_dir, FINAL_WEIGHTS))
            if self.evaluate_fn is None:
                evaluator = self._evaluator             # its records and compiled predictor
                path = save_prediction_picture(self.model, self.cfg, os.path.join(self.run_dir, PICTURE),
                                               records=evaluator.records, predictor=evaluator.predictor(self.model))
                log.info("predictions on validation images: %s", path)
        self.writer.flush()
        if not self.is_chief and not preempted:
            shutil.rmtree(self._ckpt_dir, ignore_errors=True)
        return self._summary(start, last_eval, skipped_updates, preempted)

    def _summary(self, start: float, last_eval: Dict[str, Any], skipped_updates: int,
                 preempted: bool) -> Dict[str, Any]:
        """What ``fit`` returns (and ``main.py`` prints as its last line)."""
        return {
            "score": float(last_eval.get("score", float("nan"))) if last_eval else float("nan"),
            "best_score": float(self.best_score.numpy()),
            "epochs": int(self.epoch.numpy()),
            "steps": int(self.step.numpy()),
            "skipped_updates": skipped_updates,
            "preempted": preempted,
            "seconds": round(time.time() - start, 1),
            "run_dir": os.path.abspath(self.run_dir),
            "resumed_from": self.resumed_from,
        }

    def _evaluate_into(self, record: Dict[str, Any], final: bool) -> Dict[str, Any]:
        """Evaluate, add the numbers to the epoch's ``record``, keep the best weights."""
        result = self.evaluate(final=final)
        record.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
        score = float(result.get("score", float("nan")))
        step = int(self.step.numpy())
        with self.writer.as_default(step=step):
            tf.summary.scalar("val/score", score)
        if np.isfinite(score) and score > float(self.best_score.numpy()):
            self.best_score.assign(score)
            if self.is_chief:
                save_weights_atomically(self.model, os.path.join(self.run_dir, BEST_WEIGHTS))
        if self.is_chief:
            print(f"epoch {record['epoch']}: score {score:.4f} (best {float(self.best_score.numpy()):.4f})",
                  flush=True)
        return result

    def evaluate(self, final: bool = False) -> Dict[str, Any]:
        """The validation score, computed once: on the chief (one device, cross-replica
        context), while the other workers wait; every worker gets the chief's score, and an
        error on the chief stops every worker. Per epoch on the fixed subset of
        ``max_val_images`` images; ``final``: on the whole split."""
        result: Dict[str, Any] = {}
        error = None
        if self.is_chief:
            try:
                if self.evaluate_fn is not None:
                    result = self.evaluate_fn(self.model, self.cfg)
                else:                          # built by _check_inputs on the chief
                    result = self._evaluator(self.model, writer=self.writer, step=int(self.step.numpy()),
                                             subset=not final)
            except (ValueError, FileNotFoundError) as e:
                error = str(e)
        # The score and the error flag travel in an all-reduce that the other workers are already
        # waiting in.
        score = float(result.get("score", float("nan"))) if error is None else 0.0
        score, failed = self._from_chief([score, float(error is not None)])
        if failed > 0.5:
            raise ValueError(error or "the chief's evaluation failed (see its log); stopping")
        return dict(result, score=score) if self.replicas > 1 else result

    def _history_path(self):
        return os.path.join(self.run_dir, "history.json")

    def _best_score_from_history(self) -> None:
        """The epoch-end checkpoint is written before its evaluation, so a run stopped after an
        evaluation and before the next checkpoint restores an older best score: the best of the
        restored epochs' recorded scores counts too (otherwise the next evaluation, even a worse
        one, would overwrite best.weights.h5)."""
        scores = [float(h["score"]) for h in self._load_history() if "score" in h]
        best = max([s for s in scores if np.isfinite(s)], default=float("-inf"))
        if best > float(self.best_score.numpy()):
            self.best_score.assign(best)

    def _load_history(self) -> List[Dict[str, Any]]:
        path = self._history_path()
        if self.resumed_from and os.path.exists(path):
            with open(path) as f:
                hist = json.load(f)
            return [h for h in hist if h["epoch"] <= int(self.epoch.numpy())]
        return []

    def _save_history(self, history):
        if self.is_chief:
            tmp = self._history_path() + ".tmp"
            with open(tmp, "w") as f:
                json.dump(history, f, indent=1)
            os.replace(tmp, self._history_path())
