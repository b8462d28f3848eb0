"""Context-window policies: what happens when the conversation outgrows the model's window.

(This is the ``--memory`` option; RAM figures live in the engine's stats, not here.)
Importing this package registers the policies.
"""

from fmchat import registry

from .policies import MemoryAction, NoRoom, Window, plan_room

registry.POLICIES.add("none", "none (stop with a clear message when the context is full)")
registry.POLICIES.add("sliding", "sliding window (drop the oldest turns, rebuild the cache)")
registry.POLICIES.add("shift", "context shift (drop the oldest turns, re-rotate the cached keys)")
registry.POLICIES.add("summary", "summarize the oldest turns into a note")

POLICIES = registry.POLICIES.names()

__all__ = ["POLICIES", "MemoryAction", "NoRoom", "Window", "plan_room"]
