"""haifctl: serve GGUF language models on llama.cpp, in-process or as a cluster of daemons."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("haifctl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
