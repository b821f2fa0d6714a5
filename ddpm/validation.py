"""How the library's typed configs report bad values.

Each config dataclass (`DiffusionConfig`, `TrainConfig`, `SamplerConfig`, …) lists its problems as
(field, message) pairs and raises one `ConfigError` holding all of them. The pipeline's params
schema builds the same dataclasses from params.yaml and re-words each problem under its dotted key
(`train.lr: must be > 0, got -1.0`), so a rule is written once, here in the library, whatever
reads the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

Problem = tuple[str, str]


class ConfigError(ValueError):
    """Invalid settings; `problems` holds (field, message) pairs naming each bad value."""

    def __init__(self, owner: str, problems: Sequence[Problem]) -> None:
        self.owner = owner
        self.problems = list(problems)
        listing = "; ".join(f"{name}: {message}" for name, message in self.problems)
        super().__init__(f"invalid {owner}: {listing}")


def raise_problems(owner: str, problems: Iterable[Problem]) -> None:
    found = list(problems)
    if found:
        raise ConfigError(owner, found)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> list[Problem]:
    if value in allowed:
        return []
    return [(name, f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")]


def check_positive(name: str, value: Any) -> list[Problem]:
    """`value` is None (unset) or a finite number > 0."""
    if value is None or (_is_number(value) and math.isfinite(value) and value > 0):
        return []
    return [(name, f"must be > 0, got {value!r}")]


def check_range(
    name: str, value: Any, low: float, high: float, *, closed_high: bool = True
) -> list[Problem]:
    """low <= value <= high (or < high when not `closed_high`)."""
    inside = _is_number(value) and low <= value and (value <= high if closed_high else value < high)
    if inside:
        return []
    bracket = "]" if closed_high else ")"
    return [(name, f"must be in [{low:g}, {high:g}{bracket}, got {value!r}")]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
