"""The chat engine: session, token ledger, streaming events and per-turn stats. No UI code here."""

from .events import Event, LoadProgress, TextDelta, TurnDone, TurnStarted
from .sampling import GenerationConfig
from .session import ChatSession, ContextOverflow, EmptyPrompt, Message, SessionConfig, TurnInProgress
from .stats import TurnStats

__all__ = [
    "ChatSession",
    "ContextOverflow",
    "EmptyPrompt",
    "Event",
    "GenerationConfig",
    "LoadProgress",
    "Message",
    "SessionConfig",
    "TextDelta",
    "TurnDone",
    "TurnInProgress",
    "TurnStarted",
    "TurnStats",
]
