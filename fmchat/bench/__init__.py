"""Benchmark commands: every figure the README quotes comes from one of these."""

from __future__ import annotations

import os
from pathlib import Path

from .turns import bench_turns


def default_script() -> Path:
    """The shared 20-turn conversation: $FMCHAT_BENCH_SCRIPT, or shared/bench/ beside the checkout."""
    env = os.environ.get("FMCHAT_BENCH_SCRIPT")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "bench" / "conversation.json" for p in (here.parents[3], Path.cwd().parent, Path.cwd())]
    for c in candidates:
        if c.is_file():
            return c
    from fmchat.errors import UserError

    raise UserError("no benchmark script found (looked for ../shared/bench/conversation.json); pass --script FILE")


__all__ = ["bench_turns", "default_script"]
