"""From annotation files to training batches: the record type and visibility codes (records.py),
validating readers and writers (ai_challenger.py, coco.py, errors.py, convert.py), the synthetic
data set (synthetic.py), letterbox geometry (letterbox.py), imgaug augmentation (augment.py) and
the tf.data input pipeline (pipeline.py). Imports ``config`` and ``nets`` (the SPR encoder)."""
