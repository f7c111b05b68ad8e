"""`MethodConfig` presets with user-facing errors.

The objective module is math and imports only torch, so it raises built-in ``ValueError``s; every
place that builds a method from what a user typed goes through `method_preset`, which turns them into
`ConfigError` (one line on the command line).
"""

from __future__ import annotations

from typing import Any

from sdpo.errors import ConfigError
from sdpo.objectives import MethodConfig


def method_preset(name: str, **settings: Any) -> MethodConfig:
    """``MethodConfig.preset(name, **settings)``; an unknown method or invalid setting is a ConfigError."""
    try:
        return MethodConfig.preset(name, **settings)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
