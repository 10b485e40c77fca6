"""Model runtimes behind one interface: :mod:`haifctl.runtime.base` (options, events, the runtime
protocol) and :mod:`haifctl.runtime.engine` (models, engines, the emitter)."""

from haifctl.runtime.base import (
    CancelToken,
    DeviceFacts,
    LoadOptions,
    ModelInfo,
    Runtime,
    SamplingParams,
    TokenEvent,
)
from haifctl.runtime.engine import Engine, Job, LoadedModel, Model

__all__ = [
    "CancelToken",
    "DeviceFacts",
    "Engine",
    "Job",
    "LoadOptions",
    "LoadedModel",
    "Model",
    "ModelInfo",
    "Runtime",
    "SamplingParams",
    "TokenEvent",
]
