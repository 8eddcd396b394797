"""Stream stores: the per-stream event log, idempotency keys and cancel signals."""

from .base import LogLimits, LogTrimmed, ReadResult, StreamMeta, StreamNotFound, StreamStore
from .memory import MemoryStore

__all__ = ["LogLimits", "LogTrimmed", "MemoryStore", "ReadResult", "StreamMeta", "StreamNotFound", "StreamStore"]
