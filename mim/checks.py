"""Argument validation for constructors: one place, one message style.

Every check returns the validated (converted) value, or raises ``ValueError`` with the message::

    "{Owner}.{field} must be {valid range}, got {value!r}"

e.g. ``MaskedEncoder.in_chans must be an integer >= 1, got 0``. ``owner`` is the class name as a string, or
an instance or class whose name is used. A ``bool`` is never accepted as an integer or a number.

:func:`check_encoder_data` compares a datamodule with an encoder before the first step and raises
:class:`DataMismatchError` naming both values and the fields to change.

This module imports only the standard library, so every floor of mim may use it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection
from numbers import Real
from typing import Any, TypeVar

__all__ = [
    "DataMismatchError",
    "check_bool",
    "check_choice",
    "check_encoder_data",
    "check_int",
    "check_pair_range",
    "check_range",
    "data_modality",
    "invalid",
]

T = TypeVar("T")


class DataMismatchError(ValueError):
    """Data that does not fit the model (another modality, size, channel or class count), found before training."""


def _owner_name(owner: object) -> str:
    if isinstance(owner, str):
        return owner
    return owner.__name__ if isinstance(owner, type) else type(owner).__name__


def invalid(owner: object, field: str, expected: str, value: Any, *, hint: str = "") -> ValueError:
    """The ``ValueError`` of every check: ``"{Owner}.{field} must be {expected} ({hint}), got {value!r}"``.

    For checks that the functions below do not cover; ``raise invalid(...)`` keeps the message style. ``hint``
    (every check takes one) is help text in parentheses after the valid range, e.g. ``"a fraction of training"``.
    """
    if hint:
        expected = f"{expected} ({hint})"
    return ValueError(f"{_owner_name(owner)}.{field} must be {expected}, got {value!r}")


def _fmt(x: float) -> str:
    """A bound as written in a message: integral floats without the ``.0`` (``1``, ``0.5``, ``inf``)."""
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else repr(float(x))


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(
    owner: object,
    field: str,
    value: Any,
    *,
    minimum: int | None = 1,
    maximum: int | None = None,
    hint: str = "",
) -> int:
    """An ``int`` (not a ``bool``) in ``[minimum, maximum]``; None leaves that side unbounded.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: e.g. ``"X.num_targets must be an integer >= 1, got 0"`` or ``"... an integer in [1, 100] ..."``.
    """
    if minimum is not None and maximum is not None:
        expected = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    elif maximum is not None:
        expected = f"an integer <= {maximum}"
    else:
        expected = "an integer"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise invalid(owner, field, expected, value, hint=hint)
    return value


def _range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """``"a number in (0, 1]"``; one-sided as ``"a number > 0"``; ``"a finite number >= 0"`` if inf is excluded."""
    low_inf, high_inf = low == -math.inf, high == math.inf
    finite = (low_inf and low_open) or (high_inf and high_open)
    noun = "a finite number" if finite else "a number"
    if low_inf and high_inf:
        if low_open != high_open:  # one infinity excluded, the other allowed
            return f"a number {'> -inf' if low_open else '< inf'}"
        return noun
    if high_inf:
        return f"{noun} {'>' if low_open else '>='} {_fmt(low)}"
    if low_inf:
        return f"{noun} {'<' if high_open else '<='} {_fmt(high)}"
    return f"{noun} in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"


def _in_range(x: float, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    """False for NaN, which compares false with everything."""
    return (x > low if low_open else x >= low) and (x < high if high_open else x <= high)


def check_range(
    owner: object,
    field: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A real number (not a ``bool``) in the interval from ``low`` to ``high``; NaN is always rejected.

    Bounds are closed unless ``low_open`` / ``high_open``. ``low=-math.inf`` or ``high=math.inf`` leaves a side
    unbounded; an open infinite bound excludes infinity itself (a finite number).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: e.g. ``"X.mask_ratio must be a number in (0, 1), got 1.0"``, ``"X.eps must be a number > 0,
            got 0"`` or ``"X.weight must be a finite number >= 0, got inf"``.
    """
    if not _is_number(value) or not _in_range(float(value), low, high, low_open, high_open):
        raise invalid(owner, field, _range_text(low, high, low_open, high_open), value, hint=hint)
    return float(value)


def check_pair_range(
    owner: object,
    field: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> tuple[float, float]:
    """A pair ``(lo, hi)`` of real numbers with ``low <= lo <= hi <= high`` (``<`` at an open bound).

    ``high=math.inf`` leaves the upper side unbounded (and, closed, accepts ``inf``).

    Returns:
        ``(float(lo), float(hi))``.

    Raises:
        ValueError: e.g. ``"X.target_scale must be a pair (lo, hi) with 0 < lo <= hi <= 1, got (0.5, 0.2)"``.
    """
    left = "" if low == -math.inf and not low_open else f"{_fmt(low)} {'<' if low_open else '<='} "
    right = "" if high == math.inf and not high_open else f" {'<' if high_open else '<='} {_fmt(high)}"
    expected = f"a pair (lo, hi) with {left}lo <= hi{right}"
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise invalid(owner, field, expected, value, hint=hint) from None
    if (
        isinstance(value, (str, bytes))
        or not (_is_number(lo) and _is_number(hi))
        or not (
            _in_range(float(lo), low, high, low_open, high_open)
            and _in_range(float(hi), low, high, low_open, high_open)
        )
        or not float(lo) <= float(hi)
    ):
        raise invalid(owner, field, expected, value, hint=hint)
    return float(lo), float(hi)


def check_choice(owner: object, field: str, value: T, choices: Collection[Any], *, hint: str = "") -> T:
    """One of ``choices`` (compared with ``==``; a ``bool`` never matches an integer choice).

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: e.g. ``"X.placement must be one of ('overlap', 'inside'), got 'edge'"``.
    """
    try:
        ok = value in choices
    except TypeError:  # an unhashable value looked up in a set
        ok = False
    if ok and isinstance(value, bool):
        ok = any(isinstance(c, bool) and c == value for c in choices)
    if not ok:
        raise invalid(owner, field, f"one of ({', '.join(repr(c) for c in choices)})", value, hint=hint)
    return value


def check_bool(owner: object, field: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0, 1, or a string).

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: e.g. ``"X.cache must be True or False, got 'yes'"``.
    """
    if not isinstance(value, bool):
        raise invalid(owner, field, "True or False", value)
    return value


# ---------------------------------------------------------------------------------------------- data vs encoder
def data_modality(datamodule: Any) -> str | None:
    """What a datamodule yields, from the attributes it announces: ``table`` (``num_numeric``), ``video``
    (``num_frames``), ``image`` (``in_chans`` or ``image_size``), or None when it announces none of them."""
    if hasattr(datamodule, "num_numeric"):
        return "table"
    if hasattr(datamodule, "num_frames"):
        return "video"
    if hasattr(datamodule, "in_chans") or hasattr(datamodule, "image_size"):
        return "image"
    return None


def _takes(datamodule: Any, argument: str) -> bool:
    """Whether the datamodule's constructor has ``argument`` (then the hint may tell the user to set it)."""
    try:
        return argument in inspect.signature(type(datamodule).__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - a constructor without a signature
        return False


def _or_data(datamodule: Any, argument: str, value: Any) -> str:
    return f" or data.init_args.{argument}={value}" if _takes(datamodule, argument) else ""


def check_encoder_data(
    encoder: Any,
    datamodule: Any,
    *,
    encoder_field: str = "model.init_args.encoder.init_args",
    img_size_field: str | None = None,
) -> None:
    """Refuse, before the first step, data that the encoder cannot read, naming both values and what to change.

    Compares what the datamodule announces (``in_chans``, ``image_size``, ``num_frames``, a table's ``num_numeric``
    and ``category_cardinalities``: the attributes of mim's datamodules) with the encoder's (``modality``,
    ``in_chans``, ``img_size``, ``num_frames``, a configured table encoder's schema). What either side does not
    announce is not checked (a plain ``LightningDataModule``, a DataLoader: None).

    Args:
        encoder: the encoder (a ``mim.models.base.Encoder``; read by attribute only).
        datamodule: the trainer's datamodule, or None.
        encoder_field: the config path of the encoder's arguments, for the hint.
        img_size_field: the config field that sets the encoder's image size; default ``{encoder_field}.img_size``
            (fine-tuning rebuilds the encoder from a checkpoint: ``model.init_args.img_size``).

    Raises:
        DataMismatchError: e.g. ``"MaskedEncoder.in_chans=3 but FashionMNISTDataModule yields 1-channel images: set
            model.init_args.encoder.init_args.in_chans=1"``.
    """
    if datamodule is None:
        return
    enc, data = type(encoder).__name__, type(datamodule).__name__
    kind, own_kind = data_modality(datamodule), getattr(encoder, "modality", None)
    if kind is None or own_kind is None:
        return
    if kind != own_kind:
        raise DataMismatchError(
            f"{enc} reads {own_kind}s but {data} yields {kind}s: use a {own_kind} datamodule, or an encoder for "
            f"{kind}s in {encoder_field.rsplit('.init_args', 1)[0]}"
        )
    if kind == "table":
        if not getattr(encoder, "is_configured", False):
            return  # the encoder takes its schema from this datamodule
        schema = (getattr(encoder, "num_numeric", None), list(getattr(encoder, "category_cardinalities", None) or []))
        wanted = (getattr(datamodule, "num_numeric", None), list(getattr(datamodule, "category_cardinalities", [])))
        if schema != wanted:
            raise DataMismatchError(
                f"{enc} was built for a table with (numeric, category sizes) = {schema} but {data} has {wanted}: "
                f"use a table with the same columns, or drop {encoder_field}.num_numeric and "
                "category_cardinalities so that the encoder takes the schema from the data"
            )
        return
    items = "clips" if kind == "video" else "images"
    chans, own_chans = getattr(datamodule, "in_chans", None), getattr(encoder, "in_chans", None)
    if chans is not None and own_chans is not None and int(chans) != int(own_chans):
        raise DataMismatchError(
            f"{enc}.in_chans={own_chans} but {data} yields {chans}-channel {items}: set {encoder_field}.in_chans="
            f"{chans}{_or_data(datamodule, 'in_chans', own_chans)}"
        )
    size, own_size = getattr(datamodule, "image_size", None), getattr(encoder, "img_size", None)
    if size is not None and own_size is not None and tuple(own_size) != (size, size):
        field = img_size_field or f"{encoder_field}.img_size"
        square = own_size[0] == own_size[1]
        raise DataMismatchError(
            f"{enc}.img_size={tuple(own_size)} but {data} yields {size} x {size} {items}: set {field}={size}"
            f"{_or_data(datamodule, 'image_size', own_size[0]) if square else ''}"
        )
    frames, own_frames = getattr(datamodule, "num_frames", None), getattr(encoder, "num_frames", None)
    if kind == "video" and frames is not None and own_frames is not None and int(frames) != int(own_frames):
        raise DataMismatchError(
            f"{enc}.num_frames={own_frames} but {data} yields clips of {frames} frames: set "
            f"{encoder_field}.num_frames={frames}{_or_data(datamodule, 'num_frames', own_frames)}"
        )
