"""Configuration: presets and command-line overrides (config.py), skeletons and the internal
visibility values (skeletons.py). The bottom layer: imports nothing of the project."""

from config.config import (Config, DataConfig, AugmentConfig, SprConfig, ModelConfig, LossConfig,
                           TrainConfig, PRESETS, DEFAULT_PRESET, CONFIG_FILENAME, get_preset,
                           load_config, add_config_args, config_from_args, parse_config, validate,
                           resume_differences)
from config.skeletons import Skeleton, SKELETONS, AI_CHALLENGER, COCO, ROOT, get_skeleton, joint_mapping
