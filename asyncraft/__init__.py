"""asyncraft: crash-safe, rate-limited RAFT and prompt-dataset generation through OpenAI-compatible APIs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("asyncraft")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
