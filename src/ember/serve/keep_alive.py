"""keep_alive values: seconds, or a Go duration ("5m", "1h30m"), as Ollama takes them."""

from __future__ import annotations

import re

from ember.errors import InvalidRequestError

FOREVER = None  # keep_alive that never expires
_DURATION_PART = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: str | float | int | None, default: float | None) -> float | None:
    """Seconds to keep a model loaded: a number of seconds or a Go duration ("5m", "1h30m"); negative is
    forever (None), 0 unloads at once. None means the default."""
    if value is None or value == "":
        return FOREVER if default is not None and default < 0 else default
    if isinstance(value, bool):
        raise InvalidRequestError('keep_alive must be a duration such as "5m" or a number of seconds')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(number + unit for number, unit in parts) != text.replace("+", ""):
                raise InvalidRequestError(
                    f'invalid keep_alive {value!r}: use a duration such as "5m", "1h", "30s", 0 or -1'
                ) from None
            seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    return FOREVER if seconds < 0 else seconds
