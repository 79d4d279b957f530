"""An algorithm with its parameters on a benchmark's command line: ``gptq@act_order@damp=0.02``
(a name alone means true; a value is read as JSON, else kept as text)."""

from __future__ import annotations

import json


def algorithm_and_params(text: str) -> tuple[str, dict]:
    """``"gptq@act_order@damp=0.02"`` -> ``("gptq", {"act_order": True, "damp": 0.02})``."""
    name, *settings = text.split("@")
    params: dict = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        if not eq:
            params[key] = True
            continue
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params
