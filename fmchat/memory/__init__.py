"""Memory policies: what happens when the conversation outgrows the context window."""

from .policies import POLICIES, MemoryAction, make_room

__all__ = ["POLICIES", "MemoryAction", "make_room"]
