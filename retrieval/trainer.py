"""The training API under its earlier module name: everything lives in retrieval.training."""

from retrieval.training import (  # noqa: F401
    STATE_FORMAT, Batches, StepInfo, Trainer, TrainerSettings, TrainingInterrupted, TrainRequest, TrainStep,
    Validation, build_optimizer, build_trainer, config_sha256, cpu_threads, split_validation, train,
)
