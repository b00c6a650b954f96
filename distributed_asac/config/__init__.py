"""One typed config per run: dataclass defaults ← YAML file ← `key=value` overrides.

Four rooms: `schema` (the dataclasses, their defaults and the valid names of each key), `loading` (YAML and the
command line, coerced to the fields' types; the saved config.yaml), `validation` (ranges and names that types
cannot express) and `help` (the `--help` text). Every error is a `UserError` naming the key and, where one exists,
the nearest valid key or value. The names below are the package's public ones: import them from here.
"""

from .help import describe_keys, help_text
from .loading import (RepeatedKey, UniqueKeyLoader, check_given_once, config_from_dict, load_cli_config, load_config,
                      read_saved_config, save_config)
from .schema import (ATTACK_MODELS, BATCHNORM_MODES, EPS_MODES, SELECTION_RULES, STEP_RULES, AnalysisConfig, Config,
                     DataConfig, DfrConfig, FinetuneConfig, GanConfig, GroupDroConfig, JttConfig, ModelConfig,
                     PretrainConfig, StageConfig, TrackingConfig, choices)
from .validation import GENERATOR_KEYS, MAX_SEED, SEED_KEYS, check_batch_sizes, per_rank_batch, validate

__all__ = ["ATTACK_MODELS", "BATCHNORM_MODES", "EPS_MODES", "GENERATOR_KEYS", "MAX_SEED", "SEED_KEYS",
           "SELECTION_RULES", "STEP_RULES", "AnalysisConfig", "Config", "DataConfig", "DfrConfig", "FinetuneConfig",
           "GanConfig", "GroupDroConfig", "JttConfig", "ModelConfig", "PretrainConfig", "RepeatedKey", "StageConfig",
           "TrackingConfig", "UniqueKeyLoader", "check_batch_sizes", "check_given_once", "choices", "config_from_dict",
           "describe_keys", "help_text", "load_cli_config", "load_config", "per_rank_batch", "read_saved_config", "save_config",
           "validate"]
