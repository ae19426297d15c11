"""The one training loop, used by ``main.py`` (one device) and ``distribute_main.py`` (a strategy).

Why a custom ``tf.GradientTape`` loop rather than ``Model.fit``: SPM's loss needs the targets dict
and weights, the loss must be normalised by the *global* batch so that it is identical on one
device and on N replicas, gradient clipping must act on the all-reduced gradient (Keras 3 clips
per replica), a non-finite update must stop the run naming its step without ever reaching a
checkpoint, and resume must restore model, optimizer, epoch, step and best score from
``tf.train.CheckpointManager`` in the middle of an epoch, on every worker. The same lines run
under the default strategy, MirroredStrategy and MultiWorkerMirroredStrategy.

What each step guarantees on any number of replicas:

* **One finite decision.** Every replica computes whether its gradient is finite; the flags are
  all-reduced (MIN) so that all replicas see the same answer, and a non-finite step poisons every
  replica's gradient. With ``--mixed-precision float16`` Keras' ``LossScaleOptimizer`` then skips
  the update on every replica and halves the loss scale (its own check reads replica 0 only,
  assuming all-reduced gradients); without loss scaling the run stops with
  :class:`NonFiniteLossError` naming the step. With ``--grad-clip-norm`` the gradient is
  all-reduced first and clipped by its global norm (in loss-scaled units).
* **Several steps per call.** ``steps_per_call`` steps run inside one ``tf.function`` call
  (a ``tf.while_loop`` over the distributed iterator); losses are summed on the device and read
  once per call, with the step counter, the learning rate and the first non-finite step.
  Progress, TensorBoard and checkpoints work at call boundaries; calls end at epoch and
  checkpoint boundaries.
* **Checkpoints from finite weights only.** A call whose steps were all finite is the only thing
  that reaches ``CheckpointManager.save``; the weights are checked once more before writing.
* **Resume on every worker.** Every worker restores the newest checkpoint of
  ``run_dir/checkpoints`` (the chief's; the run directory must be on storage all workers see),
  the workers' steps are compared (all-reduce MIN/MAX) and a disagreement stops the run; only the
  chief writes there. A checkpoint from another replica count or per-replica batch is refused
  naming both (the step-based schedule would otherwise move).
* **Evaluation once.** The chief evaluates (the model in cross-replica context, one device); the
  other workers wait at the next collective and receive the score by an all-reduce (MAX).

Run directory layout (everything a tool needs to rebuild and load the model)::

    run_dir/config.json           resolved config
    run_dir/checkpoints/          tf.train.Checkpoint: model, optimizer, epoch, step, best score,
                                  replicas and per-replica batch of the run
    run_dir/best.weights.h5       model weights at the best validation score
    run_dir/final.weights.h5      model weights at the end of training
    run_dir/logs/                 TensorBoard: losses, learning rate, score, prediction images
    run_dir/history.json          per-epoch losses and scores
    run_dir/predictions.png       predictions on validation images at the end
"""

from __future__ import annotations

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

from config import Config, load_config
from dataset.pipeline import InputPipeline, input_error_message, on_device
from nets.losses import spm_loss
from nets.spm_model import build_spm_model, load_backbone_weights
from utils.evaluation import Evaluator, save_prediction_picture

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
FINAL_WEIGHTS = "final.weights.h5"
PICTURE = "predictions.png"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or update; the last good checkpoint is kept."""


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


def build_optimizer(cfg: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam (AdamW when weight_decay > 0) or SGD with momentum 0.9 on the configured schedule;
    dynamic loss scaling for float16."""
    t = cfg.train
    schedule = SpmLearningRate(t.lr, steps_per_epoch, t.epochs * steps_per_epoch, t.lr_schedule,
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


def set_precision_policy(cfg: Config) -> None:
    """Set the global Keras dtype policy before the model is built."""
    policy = {"": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
    keras.mixed_precision.set_global_policy(policy[cfg.train.mixed_precision])


# ----------------------------------------------------------------------------- helpers

def is_chief_worker(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and pictures."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    spec = resolver.cluster_spec().as_dict()
    if not spec:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if "chief" in spec:
        return task_type == "chief"
    return task_type == "worker" and task_id == 0


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
            ``dataset(input_context=..., repeat=True)`` yielding per-replica batches, ``skipped``);
            None = the configured training split.
        gradient_hook: ``(grads, step) -> grads``, called in each replica on its local gradients
            before anything else sees them (tests inject non-finite gradients with it).
    """

    def __init__(self, cfg: Config, strategy: Optional[tf.distribute.Strategy] = None,
                 run_dir: Optional[str] = None,
                 evaluate_fn: Optional[Callable[[keras.Model, Config], Dict[str, Any]]] = None,
                 pipeline=None, gradient_hook: Optional[Callable[[Sequence[tf.Tensor], tf.Tensor], list]] = None):
        self.cfg = cfg
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = cfg.data.batch_size * self.replicas
        self.is_chief = is_chief_worker(self.strategy)
        self.run_dir = run_dir or cfg.train.run_dir or os.path.join("runs", cfg.preset)
        self.evaluate_fn = evaluate_fn
        self.gradient_hook = gradient_hook
        self._evaluators: Dict[bool, Evaluator] = {}      # per epoch (subset) and final (all)
        self._check_run_dir_config()
        self.loss_keys = ("total", "root", "disp") + (("joints",) if cfg.model.joint_heatmaps else ())

        self.pipeline = pipeline if pipeline is not None else InputPipeline(cfg, "train")
        self.num_examples = len(self.pipeline)
        if not cfg.train.steps_per_epoch and self.num_examples < self.global_batch:
            raise ValueError(f"the training set has {self.num_examples} images, fewer than one "
                             f"global batch of {self.global_batch}")
        self.steps_per_epoch = cfg.train.steps_per_epoch or self.num_examples // self.global_batch
        # Each input pipeline (one per worker) reads its own shard of the records and batches
        # per replica; the stream repeats, epochs are counted in steps.
        self.dist_dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: self.pipeline.dataset(input_context=ctx, repeat=True))

        set_precision_policy(cfg)
        with self.strategy.scope():
            self.model = build_spm_model(cfg)
            self.optimizer = build_optimizer(cfg, self.steps_per_epoch)
            # Keras 3 under a strategy: build optimizer slots in scope before the first step.
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.best_score = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_score")
            # What the step-based schedule depends on, checked at resume.
            self._run_replicas = tf.Variable(self.replicas, dtype=tf.int64, trainable=False, name="replicas")
            self._run_batch = tf.Variable(cfg.data.batch_size, dtype=tf.int64, trainable=False,
                                          name="batch_size")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              epoch=self.epoch, step=self.step,
                                              best_score=self.best_score, replicas=self._run_replicas,
                                              batch_size=self._run_batch)
        # Under MultiWorkerMirroredStrategy every worker must take part in a save; only the
        # chief's goes to the run directory, the others' to a scratch directory (TF's pattern).
        # Every worker *restores* from the run directory.
        self._run_ckpt_dir = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
        self._ckpt_dir = self._run_ckpt_dir if self.is_chief else tempfile.mkdtemp(prefix="spm_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, self._ckpt_dir,
                                                  max_to_keep=cfg.train.max_checkpoints)
        self.resumed_from = self._restore_or_initialise()
        self.writer = (tf.summary.create_file_writer(os.path.join(self.run_dir, "logs"))
                       if self.is_chief else tf.summary.create_noop_writer())
        self._train_call = self._make_train_call()

    # ------------------------------------------------------------------ setup

    def _check_run_dir_config(self):
        """Refuse to resume a run directory that holds a different network or skeleton."""
        path = os.path.join(self.run_dir, "config.json")
        if os.path.exists(path):
            old = load_config(path)
            for what, a, b in (("model", old.model, self.cfg.model),
                               ("skeleton", old.data.skeleton, self.cfg.data.skeleton),
                               ("input size", (old.data.input_height, old.data.input_width),
                                (self.cfg.data.input_height, self.cfg.data.input_width))):
                fields = ("backbone", "head", "head_channels", "head_blocks")
                if what == "model":
                    a = {f: getattr(a, f) for f in fields}
                    b = {f: getattr(b, f) for f in fields}
                if a != b:
                    raise ValueError(f"{self.run_dir} holds a run with another {what} ({a} vs {b}); "
                                     f"choose a new --run-dir or delete that directory")
        if self.is_chief:
            self.cfg.save(self.run_dir)

    def _restore_or_initialise(self) -> Optional[str]:
        latest = tf.train.latest_checkpoint(self._run_ckpt_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            saved = (int(self._run_replicas.numpy()), int(self._run_batch.numpy()))
            if saved != (self.replicas, self.cfg.data.batch_size):
                raise ValueError(
                    f"{latest} was trained with {saved[0]} replica(s) x batch {saved[1]} per replica "
                    f"(global batch {saved[0] * saved[1]}); this run has {self.replicas} replica(s) x "
                    f"batch {self.cfg.data.batch_size} (global batch {self.global_batch}). The step-based "
                    f"schedule and epoch length depend on the global batch: resume with the same "
                    f"replicas and --batch-size, or start a new --run-dir (--finetune "
                    f"{os.path.join(self.run_dir, FINAL_WEIGHTS)} keeps the weights)")
            log.info("resumed from %s at epoch %d, step %d", latest, int(self.epoch.numpy()),
                     int(self.step.numpy()))
        elif self.cfg.train.finetune:
            self.model.load_weights(self.cfg.train.finetune)
            log.info("fine-tuning from %s", self.cfg.train.finetune)
        elif self.cfg.model.backbone_weights:
            load_backbone_weights(self.model, self.cfg.model.backbone_weights)
            log.info("backbone weights from %s", self.cfg.model.backbone_weights)
        self._check_workers_agree()
        return latest

    def _sum_over_replicas(self, value: float) -> float:
        """The sum of ``value`` over all replicas of all workers (every worker must call it)."""
        def fn():
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(value, tf.float64))

        return float(self.strategy.experimental_local_results(self.strategy.run(fn))[0].numpy())

    def _check_workers_agree(self):
        """Every worker must have restored the same step (a worker that cannot see the chief's
        checkpoints would start from 0 and the all-reduce would mix two models): the variance
        of the replicas' steps, from two sums, must be zero."""
        if self.replicas == 1:
            return
        step = float(self.step.numpy())
        mean = self._sum_over_replicas(step) / self.replicas
        mean_square = self._sum_over_replicas(step * step) / self.replicas
        if abs(mean_square - mean * mean) > 1e-6 * max(1.0, mean * mean):
            raise ValueError(f"the workers restored different steps (this worker: {int(step)}, mean over "
                             f"workers: {mean:g}): every worker restores {self._run_ckpt_dir}, so the "
                             f"run directory must be on storage that all workers see")

    def _make_train_call(self):
        cfg, model, opt, strategy = self.cfg, self.model, self.optimizer, self.strategy
        global_batch, replicas = self.global_batch, self.replicas
        clip = cfg.train.grad_clip_norm
        loss_scaling = isinstance(opt, keras.optimizers.LossScaleOptimizer)
        hook = self.gradient_hook
        variables = model.trainable_variables

        def replica_step(images, labels, step):
            # The host sends uint8 pictures and padded points; colour and targets are made here.
            images, targets = on_device(images, labels, cfg)
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                losses = spm_loss(targets, outputs, cfg.loss, global_batch)
                scaled = opt.scale_loss(losses["total"]) if loss_scaling else losses["total"]
            grads = tape.gradient(scaled, variables)
            if hook is not None:
                grads = hook(grads, step)
            ctx = tf.distribute.get_replica_context()
            if clip > 0:
                # Clip the *all-reduced* gradient by its global norm (in loss-scaled units), then
                # hand each replica 1/N of it: the optimizer's own all-reduce sums them back.
                total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                limit = clip * (opt.dynamic_scale if loss_scaling else 1.0)
                total, _ = tf.clip_by_global_norm(total, limit)
                grads = [g / replicas for g in total]
            local = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            finite = ctx.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(local, tf.float32)) < 0.5
            # The same decision on every replica: a step that is non-finite anywhere is
            # non-finite everywhere (LossScaleOptimizer reads replica 0's gradients only).
            poison = tf.where(finite, 0.0, float("nan"))
            grads = [g + tf.cast(poison, g.dtype) for g in grads]
            opt.apply_gradients(zip(grads, variables))
            return losses, finite

        step_fn = tf.function(replica_step, jit_compile=True) if cfg.train.xla else replica_step

        @tf.function
        def train_call(iterator, num_steps):
            """``num_steps`` steps; summed losses, the first bad step (-1: none) and the
            number of steps whose update was skipped for a non-finite gradient (float16)."""
            sums = {k: tf.constant(0.0, tf.float32) for k in self.loss_keys}
            first_bad = tf.constant(-1, tf.int64)
            skipped = tf.constant(0, tf.int64)
            for _ in tf.range(num_steps):
                images, labels = next(iterator)
                step = self.step.assign_add(1)
                losses, finite = strategy.run(step_fn, args=(images, labels, step))
                losses = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, losses[k], axis=None)
                          for k in self.loss_keys}
                finite = strategy.experimental_local_results(finite)[0]
                loss_ok = tf.reduce_all([tf.math.is_finite(v) for v in losses.values()])
                bad = tf.logical_not(loss_ok) if loss_scaling else tf.logical_not(loss_ok & finite)
                first_bad = tf.where((first_bad < 0) & bad, step, first_bad)
                skipped += tf.cast(tf.logical_not(finite) & loss_ok, tf.int64) if loss_scaling else 0
                sums = {k: sums[k] + losses[k] for k in self.loss_keys}
            out = {**sums, "first_bad": first_bad, "skipped": skipped, "step": self.step.read_value(),
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

    def run_steps(self, iterator, num_steps: int) -> Dict[str, float]:
        """``num_steps`` training steps in one call (one host sync); the mean losses.

        Raises NonFiniteLossError naming the first step whose loss (or, without loss scaling,
        whose update) was not finite; nothing of that call reaches a checkpoint.
        """
        try:
            out = {k: v.numpy() for k, v in self._train_call(iterator, tf.constant(num_steps, tf.int64)).items()}
        except tf.errors.OpError as e:
            message = input_error_message(e)          # e.g. a wrong image folder: one clear line
            if message is None:
                raise
            raise ValueError(message) from None
        if int(out["first_bad"]) >= 0:
            bad = int(out["first_bad"])
            raise NonFiniteLossError(
                f"non-finite loss or update at step {bad} (epoch {bad // self.steps_per_epoch + 1}): "
                f"mean over the last {num_steps} steps " +
                ", ".join(f"{k}={float(out[k]) / num_steps:.4g}" for k in self.loss_keys) +
                f"; the last good checkpoint is kept in {self._run_ckpt_dir}; try a lower --lr or "
                f"--grad-clip-norm")
        result = {k: float(out[k]) / num_steps for k in self.loss_keys}
        result.update(lr=float(out["lr"]), step=int(out["step"]), skipped=int(out["skipped"]))
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

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        start = time.time()
        epochs = cfg.train.epochs
        history = self._load_history()
        data_iter = iter(self.dist_dataset)
        last_eval: Dict[str, Any] = history[-1] if history else {}
        skipped_updates = 0
        log_every = max(1, cfg.train.log_every_steps)
        while int(self.epoch.numpy()) < epochs:
            epoch = int(self.epoch.numpy())
            step = int(self.step.numpy())
            end_of_epoch = (epoch + 1) * self.steps_per_epoch
            progress = _Progress(self.steps_per_epoch, epoch, epochs, self.is_chief)
            sums: Dict[str, float] = {}
            n = 0
            while step < end_of_epoch:
                num = self._steps_in_next_call(step, end_of_epoch)
                losses = self.run_steps(data_iter, num)
                logged, step = step, losses.pop("step")
                skipped_updates += losses.pop("skipped")
                for k in self.loss_keys:
                    sums[k] = sums.get(k, 0.0) + losses[k] * num
                n += num
                progress.update(step - epoch * self.steps_per_epoch, losses)
                if step // log_every > logged // log_every:
                    with self.writer.as_default(step=step):
                        for k in self.loss_keys:
                            tf.summary.scalar(f"loss/{k}", losses[k])
                        tf.summary.scalar("learning_rate", losses["lr"])
                        if "loss_scale" in losses:
                            tf.summary.scalar("loss_scale", losses["loss_scale"])
                            tf.summary.scalar("skipped_updates", skipped_updates)
                if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                    self.save_checkpoint()
            self.epoch.assign(epoch + 1)
            record = {"epoch": epoch + 1, "step": step,
                      **{f"loss_{k}": v / max(n, 1) for k, v in sums.items()},
                      "skipped_images": self.pipeline.skipped.count}
            if skipped_updates:
                record["skipped_updates"] = skipped_updates
            if self.pipeline.skipped.count and self.is_chief:
                log.warning("%s", self.pipeline.skipped.summary())
            if (epoch + 1) % max(1, cfg.train.eval_every_epochs) == 0 or epoch + 1 == epochs:
                last_eval = self.evaluate(final=epoch + 1 == epochs)
                record.update({k: v for k, v in last_eval.items() if isinstance(v, (int, float))})
                score = float(last_eval.get("score", float("nan")))
                with self.writer.as_default(step=step):
                    tf.summary.scalar("val/score", score)
                if np.isfinite(score) and score > float(self.best_score.numpy()):
                    self.best_score.assign(score)
                    if self.is_chief:
                        self.model.save_weights(os.path.join(self.run_dir, BEST_WEIGHTS))
                if self.is_chief:
                    print(f"epoch {epoch + 1}: score {score:.4f} (best {float(self.best_score.numpy()):.4f})",
                          flush=True)
            history.append(record)
            self.save_checkpoint()
            self._save_history(history)
        # The iterator's threads may call into Python: end them before returning.
        del data_iter
        if self.is_chief:
            self.model.save_weights(os.path.join(self.run_dir, FINAL_WEIGHTS))
            if self.evaluate_fn is None:
                path = save_prediction_picture(self.model, self.cfg, os.path.join(self.run_dir, PICTURE))
                log.info("predictions on validation images: %s", path)
        self.writer.flush()
        if not self.is_chief:
            shutil.rmtree(self._ckpt_dir, ignore_errors=True)
        return {
            "score": float(last_eval.get("score", float("nan"))) if last_eval else float("nan"),
            "best_score": float(self.best_score.numpy()),
            "epochs": int(self.epoch.numpy()),
            "steps": int(self.step.numpy()),
            "seconds": round(time.time() - start, 1),
            "run_dir": os.path.abspath(self.run_dir),
            "resumed_from": self.resumed_from,
        }

    def evaluate(self, final: bool = False) -> Dict[str, Any]:
        """The validation score, computed once: on the chief (one device, cross-replica
        context), while the other workers wait; every worker gets the chief's score. Per epoch
        on the fixed subset of ``max_val_images`` images; ``final``: on the whole split."""
        result: Dict[str, Any] = {}
        if self.is_chief:
            if self.evaluate_fn is not None:
                result = self.evaluate_fn(self.model, self.cfg)
            else:
                if final not in self._evaluators:
                    self._evaluators[final] = Evaluator(self.cfg, flip=self.cfg.train.eval_flip, subset=not final)
                result = self._evaluators[final](self.model, writer=self.writer, step=int(self.step.numpy()))
        if self.replicas > 1:
            # The score travels in an all-reduce that the other workers are already waiting in:
            # the chief's replicas carry score / (its replicas), the others' carry 0.
            local_replicas = len(self.strategy.extended.worker_devices)
            share = float(result.get("score", float("nan"))) / local_replicas if self.is_chief else 0.0
            result = dict(result, score=self._sum_over_replicas(share))
        return result

    def _history_path(self):
        return os.path.join(self.run_dir, "history.json")

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
