"""The one training loop, used by ``main.py`` (one device) and ``distribute_main.py`` (a strategy).

Why a custom ``tf.GradientTape`` loop rather than ``Model.fit``: SPM's loss needs the targets dict
and weights, the loss must be normalised by the *global* batch so that it is identical on one
device and on N replicas, gradient clipping must act on the all-reduced gradient (Keras 3 clips
per replica), a NaN must stop the run naming its step without overwriting the last good
checkpoint, and resume must restore model, optimizer, epoch, step and best score from
``tf.train.CheckpointManager`` in the middle of an epoch. All of that is a few dozen explicit
lines here, and the same lines run under the default strategy, MirroredStrategy and
MultiWorkerMirroredStrategy.

Run directory layout (everything a tool needs to rebuild and load the model)::

    run_dir/config.json           resolved config
    run_dir/checkpoints/          tf.train.Checkpoint: model, optimizer, epoch, step, best score
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
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import keras
import tensorflow as tf

from config import Config, load_config
from dataset.pipeline import InputPipeline
from nets.losses import spm_loss
from nets.spm_model import build_spm_model, load_backbone_weights
from utils.evaluation import Evaluator, save_prediction_picture

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
FINAL_WEIGHTS = "final.weights.h5"
PICTURE = "predictions.png"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


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
    """Adam (AdamW when weight_decay > 0) on the configured schedule; loss scaling for float16."""
    t = cfg.train
    schedule = SpmLearningRate(t.lr, steps_per_epoch, t.epochs * steps_per_epoch, t.lr_schedule,
                               t.lr_decay_epochs, t.lr_decay_factor, t.warmup_steps)
    if t.weight_decay > 0:
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


def _finite(value) -> bool:
    return bool(np.isfinite(value))


class _Progress:
    """A Keras progress bar with the loss components, or nothing on non-chief workers."""

    def __init__(self, steps: int, epoch: int, epochs: int, enabled: bool):
        self.bar = None
        if enabled:
            print(f"Epoch {epoch + 1}/{epochs}", flush=True)
            # A live bar on a terminal; one line per epoch in logs and CI.
            self.bar = keras.utils.Progbar(steps, stateful_metrics=["lr"],
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
            evaluation (utils.evaluation.Evaluator on the validation set).
        pipeline: the training input (``dataset.pipeline.InputPipeline``: ``len()``,
            ``dataset(input_context=..., repeat=True)`` yielding per-replica batches, ``skipped``);
            None = the configured training split.
    """

    def __init__(self, cfg: Config, strategy: Optional[tf.distribute.Strategy] = None,
                 run_dir: Optional[str] = None,
                 evaluate_fn: Optional[Callable[[keras.Model, Config], Dict[str, Any]]] = None,
                 pipeline=None):
        self.cfg = cfg
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = cfg.data.batch_size * self.replicas
        self.is_chief = is_chief_worker(self.strategy)
        self.run_dir = run_dir or cfg.train.run_dir or os.path.join("runs", cfg.preset)
        self.evaluate_fn = evaluate_fn
        self._evaluator = None
        self._check_run_dir_config()

        if pipeline is None:
            pipeline = InputPipeline(cfg, "train")
        self.pipeline = pipeline
        self.num_examples = len(pipeline)
        if not cfg.train.steps_per_epoch and self.num_examples < self.global_batch:
            raise ValueError(f"the training set has {self.num_examples} images, fewer than one "
                             f"global batch of {self.global_batch}")
        self.steps_per_epoch = cfg.train.steps_per_epoch or self.num_examples // self.global_batch
        # Each input pipeline (one per worker) reads its own shard of the records and batches
        # per replica; the stream repeats, epochs are counted in steps.
        self.dist_dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: pipeline.dataset(input_context=ctx, repeat=True))

        set_precision_policy(cfg)
        with self.strategy.scope():
            self.model = build_spm_model(cfg)
            self.optimizer = build_optimizer(cfg, self.steps_per_epoch)
            # Keras 3 under a strategy: build optimizer slots in scope before the first step.
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.best_score = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_score")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              epoch=self.epoch, step=self.step,
                                              best_score=self.best_score)
        # Under MultiWorkerMirroredStrategy every worker must take part in a save; only the
        # chief's goes to the run directory, the others' to a scratch directory (TF's pattern).
        self._ckpt_dir = os.path.join(self.run_dir, CHECKPOINT_SUBDIR) if self.is_chief else \
            tempfile.mkdtemp(prefix="spm_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, self._ckpt_dir,
                                                  max_to_keep=cfg.train.max_checkpoints)
        self.resumed_from = self._restore_or_initialise()
        self.writer = (tf.summary.create_file_writer(os.path.join(self.run_dir, "logs"))
                       if self.is_chief else tf.summary.create_noop_writer())
        self._train_step = self._make_train_step()

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
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            log.info("resumed from %s at epoch %d, step %d", latest, int(self.epoch.numpy()),
                     int(self.step.numpy()))
            return latest
        if self.cfg.train.finetune:
            self.model.load_weights(self.cfg.train.finetune)
            log.info("fine-tuning from %s", self.cfg.train.finetune)
        elif self.cfg.model.backbone_weights:
            load_backbone_weights(self.model, self.cfg.model.backbone_weights)
            log.info("backbone weights from %s", self.cfg.model.backbone_weights)
        return None

    def _make_train_step(self):
        cfg, model, opt = self.cfg, self.model, self.optimizer
        global_batch = self.global_batch
        clip = cfg.train.grad_clip_norm
        replicas = self.replicas
        loss_scaling = isinstance(opt, keras.optimizers.LossScaleOptimizer)

        def replica_step(images, targets):
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                losses = spm_loss(targets, outputs, cfg.loss, global_batch)
                loss = losses["total"]
                scaled = opt.scale_loss(loss) if loss_scaling else loss
            grads = tape.gradient(scaled, model.trainable_variables)
            if clip > 0:
                # Clip the *all-reduced* gradient by its global norm, then hand each replica
                # 1/N of it: the optimizer's own all-reduce sums them back to the clipped total.
                ctx = tf.distribute.get_replica_context()
                total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                limit = clip * (opt.dynamic_scale if loss_scaling else 1.0)
                total, _ = tf.clip_by_global_norm(total, limit)
                grads = [g / replicas for g in total]
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return losses

        @tf.function(jit_compile=cfg.train.xla or None)
        def compiled_replica_step(images, targets):
            return replica_step(images, targets)

        step_fn = compiled_replica_step if cfg.train.xla else replica_step

        @tf.function
        def train_step(batch):
            images, targets = batch
            per_replica = self.strategy.run(step_fn, args=(images, targets))
            return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                    for k, v in per_replica.items()}

        return train_step

    # ------------------------------------------------------------------ loop

    def save_checkpoint(self):
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if self.is_chief:
            log.info("checkpoint %s", path)
        return path

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        start = time.time()
        epochs = cfg.train.epochs
        history = self._load_history()
        data_iter = None
        last_eval: Dict[str, Any] = history[-1] if history else {}
        while int(self.epoch.numpy()) < epochs:
            epoch = int(self.epoch.numpy())
            done_in_epoch = int(self.step.numpy()) - epoch * self.steps_per_epoch
            if data_iter is None:
                data_iter = iter(self.dist_dataset)
            progress = _Progress(self.steps_per_epoch, epoch, epochs, self.is_chief)
            sums: Dict[str, float] = {}
            n = 0
            for i in range(done_in_epoch, self.steps_per_epoch):
                try:
                    batch = next(data_iter)
                except StopIteration:
                    data_iter = iter(self.dist_dataset)
                    batch = next(data_iter)
                losses = {k: float(v) for k, v in self._train_step(batch).items()}
                step = int(self.step.assign_add(1).numpy())
                if not all(_finite(v) for v in losses.values()):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (epoch {epoch + 1}): " +
                        ", ".join(f"{k}={v}" for k, v in losses.items()) +
                        f"; the last good checkpoint is kept in {self._ckpt_dir}; try a lower --lr "
                        f"or --grad-clip-norm")
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                lr = float(self.optimizer.learning_rate.numpy()) if hasattr(
                    self.optimizer.learning_rate, "numpy") else float(self.optimizer.learning_rate)
                progress.update(i + 1, {**losses, "lr": lr})
                if step % max(1, cfg.train.log_every_steps) == 0:
                    with self.writer.as_default(step=step):
                        for k, v in losses.items():
                            tf.summary.scalar(f"loss/{k}", v)
                        tf.summary.scalar("learning_rate", lr)
                if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                    self.save_checkpoint()
            self.epoch.assign(epoch + 1)
            record = {"epoch": epoch + 1, "step": int(self.step.numpy()),
                      **{f"loss_{k}": v / max(n, 1) for k, v in sums.items()},
                      "skipped_images": self.pipeline.skipped.count}
            if self.pipeline.skipped.count and self.is_chief:
                log.warning("%s", self.pipeline.skipped.summary())
            if (epoch + 1) % max(1, cfg.train.eval_every_epochs) == 0 or epoch + 1 == epochs:
                last_eval = self.evaluate()
                record.update({k: v for k, v in last_eval.items() if isinstance(v, (int, float))})
                score = float(last_eval.get("score", float("nan")))
                with self.writer.as_default(step=int(self.step.numpy())):
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

    def evaluate(self) -> Dict[str, Any]:
        if self.evaluate_fn is not None:
            return self.evaluate_fn(self.model, self.cfg)
        if self._evaluator is None:
            self._evaluator = Evaluator(self.cfg)
        return self._evaluator(self.model, writer=self.writer if self.is_chief else None,
                               step=int(self.step.numpy()))

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

