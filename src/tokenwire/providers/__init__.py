"""Model backends: each an async stream of events that stops its work when cancelled."""

from .base import GenerationRequest, Provider

__all__ = ["GenerationRequest", "Provider"]
