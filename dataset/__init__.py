"""Annotation readers, augmentation, synthetic data and the tf.data pipeline."""
