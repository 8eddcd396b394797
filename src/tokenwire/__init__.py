"""tokenwire: stream LLM tokens to the browser as SSE over fetch, with cancellation that reaches the model."""

from ._app import create_app
from ._client import stream_tokens
from ._config import Settings
from ._events import (
    Done,
    Error,
    Finish,
    Queued,
    Reasoning,
    ReasoningSignature,
    RedactedReasoning,
    Refusal,
    Start,
    Token,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
    UsageUpdate,
    encode_event,
)
from ._exceptions import (
    AdmissionRefused,
    ClientError,
    ConfigError,
    IdempotencyConflict,
    ProviderError,
    RequestError,
    StreamCut,
    TokenwireError,
    TokenwireHTTPError,
)
from ._message import Accumulator, AssistantMessage, ToolCall, accumulate
from ._relay import Relay, RelayOptions
from ._response import EventStreamResponse
from ._sse import ServerSentEvent, SSEDecoder
from .providers.base import GenerationRequest, Provider
from .providers.scripted import ScriptedProvider

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "AdmissionRefused",
    "AssistantMessage",
    "ClientError",
    "ConfigError",
    "Done",
    "Error",
    "EventStreamResponse",
    "Finish",
    "GenerationRequest",
    "IdempotencyConflict",
    "Provider",
    "ProviderError",
    "Queued",
    "Reasoning",
    "ReasoningSignature",
    "RedactedReasoning",
    "Refusal",
    "Relay",
    "RelayOptions",
    "RequestError",
    "SSEDecoder",
    "ScriptedProvider",
    "ServerSentEvent",
    "Settings",
    "Start",
    "StreamCut",
    "Token",
    "TokenwireError",
    "TokenwireHTTPError",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "Usage",
    "UsageUpdate",
    "accumulate",
    "create_app",
    "encode_event",
    "stream_tokens",
]
