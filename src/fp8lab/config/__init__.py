"""Job configuration: one dataclass per component (sections.py), TOML files and dotted CLI
overrides (loading.py). Precedence is CLI > TOML > defaults."""

from fp8lab.config.loading import (
    INT_LIMIT,
    SECTIONS,
    config_from_dict,
    describe_fields,
    load_config,
    parse_overrides,
)
from fp8lab.config.sections import (
    DEFAULT_LADDER,
    STOP_SIGNALS,
    CheckpointConfig,
    DataConfig,
    DebugConfig,
    GuardConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)

__all__ = [
    "INT_LIMIT", "SECTIONS", "config_from_dict", "describe_fields", "load_config", "parse_overrides",
    "DEFAULT_LADDER", "STOP_SIGNALS", "CheckpointConfig", "DataConfig", "DebugConfig", "GuardConfig", "JobConfig",
    "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig", "TrainConfig",
]
