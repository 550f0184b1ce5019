"""The checks every configuration shares: each raises a `ValueError` naming the field, what it got and what it
accepts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def is_finite_number(value: Any) -> bool:
    """True for a finite int or float (not a bool): what the numeric fields of every config accept."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(name: str, value: Any, accepted: Sequence[Any]) -> None:
    """`value` must be one of `accepted`."""
    if value not in accepted:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in accepted)}; got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """`value` must be `True` or `False` (not merely truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> None:
    """`value` must be an integer (not a bool) in `[minimum, maximum]`; `None` passes when `optional`."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            accepted = f"an integer in {minimum}..{maximum}"
        elif minimum is not None:
            accepted = f"an integer >= {minimum}"
        else:
            accepted = "an integer"
        raise ValueError(f"`{name}` must be {'None or ' if optional else ''}{accepted}; got {value!r}.")


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                 strict_minimum: bool = False, strict_maximum: bool = False, optional: bool = False,
                 hint: str = "") -> None:
    """`value` must be a finite number (not a bool) within the bounds (`strict_*`: the bound itself excluded);
    `None` passes when `optional`. `hint` is added to the error."""
    if optional and value is None:
        return
    valid = is_finite_number(value)
    if valid and minimum is not None:
        valid = value > minimum if strict_minimum else value >= minimum
    if valid and maximum is not None:
        valid = value < maximum if strict_maximum else value <= maximum
    if not valid:
        if minimum is not None and maximum is not None:
            accepted = f"in {'(' if strict_minimum else '['}{minimum:g}, {maximum:g}{')' if strict_maximum else ']'}"
        elif minimum is not None:
            accepted = f"{'>' if strict_minimum else '>='} {minimum:g}"
        elif maximum is not None:
            accepted = f"{'<' if strict_maximum else '<='} {maximum:g}"
        else:
            accepted = ""
        kind = "a number" if minimum is not None and maximum is not None else "a finite number"
        raise ValueError(f"`{name}` must be {'None or ' if optional else ''}{kind} {accepted}".rstrip()
                         + f"; got {value!r}.{hint}")


def check_fraction(name: str, value: Any, strict_maximum: bool = True) -> None:
    """`value` must be a fraction in [0, 1) (`[0, 1]` without `strict_maximum`); a percentage such as 90 is
    refused with the fraction it likely means."""
    percent = is_finite_number(value) and 1 < value <= 100
    hint = f" A fraction is expected: {value / 100:g} for {value:g}%." if percent else ""
    check_number(name, value, 0.0, 1.0, strict_maximum=strict_maximum, hint=hint)


def missing_attribute(obj: Any, name: str, callback_hint: str) -> AttributeError:
    """The error for `getattr(obj, name)` on a config object: a `Trainer` that was given the config in
    `callbacks=[...]` asks it for its `on_*` events, and is told which callback to pass (`callback_hint`)."""
    if name.startswith("on_"):
        return AttributeError(f"A {type(obj).__name__} was passed where the Trainer expects a callback (it asked for "
                              f"`{name}`): pass {callback_hint} in `callbacks=[...]`, not the {type(obj).__name__} "
                              "itself.")
    return AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r}")
