"""Model runtimes behind one interface (see :mod:`haifctl.runtime.base`)."""

from haifctl.runtime.base import (
    CancelToken,
    DeviceFacts,
    LoadedModel,
    LoadOptions,
    ModelInfo,
    Runtime,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "CancelToken",
    "DeviceFacts",
    "LoadOptions",
    "LoadedModel",
    "ModelInfo",
    "Runtime",
    "SamplingParams",
    "TokenEvent",
]
