"""What differs between the transformers versions fmchat supports (see pyproject.toml; CI runs the upper end)."""

from __future__ import annotations

import transformers
from packaging.version import Version

# transformers 5.24 renamed the models' ``past_key_values`` argument to ``cache``; the old name still works there
# but logs a deprecation warning on every run. Older 5.x versions only know ``past_key_values``.
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
