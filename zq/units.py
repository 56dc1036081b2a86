"""Durations and sizes written as text: "500ms", "30s", "7d"; "1024", "10KB", "512MiB".

`parse_duration_ms` takes "500ms", "30s", "5m", "2h", "7d" or "1w" (a bare int is milliseconds).
`parse_bytes` takes "1024", "10KB", "512MiB", "100GB": KB, MB, GB, TB and PB are powers of 1000
(as disk makers and the SI count), KiB, MiB, GiB, TiB and PiB powers of 1024. Both accept a
decimal number ("1.5s", "0.5GB") when the result is a whole number of milliseconds or bytes.
`format_duration_ms` and `format_bytes` write the shortest exact form back. The topology file
(zq.topology) and the command line read their values with these.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from zq.errors import TopologyError


class InvalidValue(TopologyError, ValueError):
    """A duration or size that does not parse. A ValueError too, so that option parsers accept it."""


def described(value: Any) -> str:
    """A TOML value in words, for an error message: `the string "30"`, `an array`."""
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (true/false)"
    if isinstance(value, int):
        return f"the number {value}"
    if isinstance(value, float):
        return f"the decimal number {value}"
    if isinstance(value, str):
        return f"the string {quoted(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a date/time ({value})"


def quoted(text: str) -> str:
    """Text in double quotes, as TOML writes strings, so a message can be pasted back into the file."""
    return json.dumps(text, ensure_ascii=False)


DURATION_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
BYTE_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4, "pb": 1000 ** 5,
    "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4, "pib": 1024 ** 5,
}
_BYTE_UNIT_NAMES = {"b": "B", "kb": "KB", "mb": "MB", "gb": "GB", "tb": "TB", "pb": "PB",
                    "kib": "KiB", "mib": "MiB", "gib": "GiB", "tib": "TiB", "pib": "PiB"}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_TEXT_CHARS_MAX = 64   # a duration or size longer than this is not one; keeps Decimal work bounded


def parse_duration_ms(text: str | int) -> int:
    """Milliseconds in "500ms", "30s", "5m", "2h", "7d", "1w" (or "1.5s"); an int is already ms."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidValue(f"a duration must be a string like \"30s\" or a whole number of milliseconds, "
                           f"not {described(text)}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidValue(f"a duration cannot be negative, got {text}")
        return text
    number, unit = _split_number_unit(text, "duration", 'e.g. "500ms", "30s", "5m", "2h", "7d" or "1w"')
    if not unit:
        raise InvalidValue(f"duration {quoted(text)} has no unit; add one of ms, s, m, h, d, w, e.g. \"{number}s\"")
    scale = DURATION_UNITS_MS.get(unit)
    if scale is None:
        raise InvalidValue(f"duration {quoted(text)} has an unknown unit {quoted(unit)}; use one of ms, s, m, h, d, w")
    return _whole(number * scale, text, "milliseconds")


def parse_bytes(text: str | int) -> int:
    """Bytes in "1024", "10KB" (10 000), "512MiB" (512 * 1024**2), "100GB"; an int is already bytes.

    KB, MB, GB, TB, PB are powers of 1000; KiB, MiB, GiB, TiB, PiB are powers of 1024; units are
    case-insensitive."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidValue(f"a size must be a string like \"100GB\" or a whole number of bytes, not {described(text)}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidValue(f"a size cannot be negative, got {text}")
        return text
    number, unit = _split_number_unit(text, "size", 'e.g. "1024", "10KB", "512MiB" or "100GB"')
    scale = BYTE_UNITS.get(unit.lower()) if unit else 1
    if scale is None:
        raise InvalidValue(f"size {quoted(text)} has an unknown unit {quoted(unit)}; use B, KB, MB, GB, TB, PB "
                           f"(powers of 1000) or KiB, MiB, GiB, TiB, PiB (powers of 1024)")
    return _whole(number * scale, text, "bytes")


def format_duration_ms(ms: int) -> str:
    """The shortest exact text for `ms`: 90_000 -> "90s", 604_800_000 -> "1w", 1500 -> "1500ms"."""
    if ms < 0:
        raise ValueError(f"negative duration {ms}")
    for unit, scale in sorted(DURATION_UNITS_MS.items(), key=lambda item: -item[1]):
        if ms and ms % scale == 0:
            return f"{ms // scale}{unit}"
    return f"{ms}ms"


def format_bytes(size: int) -> str:
    """The shortest exact text for `size`: 100_000_000_000 -> "100GB", 1_048_576 -> "1MiB"."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    candidates = [f"{size}"]
    for unit, scale in BYTE_UNITS.items():
        if scale > 1 and size and size % scale == 0:
            candidates.append(f"{size // scale}{_BYTE_UNIT_NAMES[unit]}")
    return min(candidates, key=lambda text: (len(text), text.isdigit()))  # on a tie, "1KiB" reads better than "1024"


def _split_number_unit(text: str, what: str, example: str) -> tuple[Decimal, str]:
    match = _NUMBER_UNIT.match(text) if len(text) <= _TEXT_CHARS_MAX else None
    if match is None:
        raise InvalidValue(f"{quoted(text)} is not a {what}; write a number and a unit, {example}")
    try:
        return Decimal(match.group(1)), match.group(2)
    except InvalidOperation:  # the regex admits only plain decimals; kept for safety
        raise InvalidValue(f"{quoted(text)} is not a {what}; write a number and a unit, {example}") from None


def _whole(value: Decimal, text: str, unit: str) -> int:
    if value != value.to_integral_value():
        raise InvalidValue(f"{quoted(text)} is not a whole number of {unit}; use a smaller unit")
    return int(value)
