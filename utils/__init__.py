"""What runs a model: GPU selection and strategies (distribute.py), the training loop
(training.py), preemption signals (preemption.py), rebuilding a trained run and predicting poses (predict.py), the official AI
Challenger metric (aic_eval.py), scoring and the per-epoch evaluator (evaluation.py), export
(export.py) and drawing (drawing.py). The top library layer: imports ``config``, ``nets``,
``dataset``; imported by ``tools/``, ``main.py`` and ``distribute_main.py``."""
