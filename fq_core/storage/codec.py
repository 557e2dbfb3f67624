"""JSON at the edge: the one place a number that is not finite becomes a word and back.

In memory a measured number is `float | None`: None is "not measured", NaN and ±Inf are what
was measured. JSON has no NaN or infinity and null already means "not measured", so every
file fq-suite writes (records, cache entries, the gate record, --json outputs) stores them as
the words "nan", "inf" and "-inf", and reading a file into a typed struct turns those words
into floats again. Nothing else in the library converts between the two.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

#: The stored spelling of each non-finite float.
WORDS = ("nan", "inf", "-inf")

_ENCODER = msgspec.json.Encoder()


def _hook(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


def _from_hook(type_: type, value: Any) -> Any:
    if type_ is Path:
        return Path(value)
    raise NotImplementedError(f"cannot read a {type_.__name__} from JSON")


def _word(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _words(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return _word(value)
    if isinstance(value, dict):
        return {k: _words(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_words(v) for v in value]
    return value


def to_builtins(value: Any) -> Any:
    """Plain JSON data (Structs, dataclasses, tuples, paths, numpy scalars included) with
    every NaN / ±Inf float as its word."""
    return _words(msgspec.to_builtins(value, enc_hook=_hook, str_keys=True))


def encode(value: Any, *, indent: int = 0) -> bytes:
    """JSON bytes; `indent` > 0 pretty-prints (people read records)."""
    raw = _ENCODER.encode(to_builtins(value))
    return msgspec.json.format(raw, indent=indent) if indent else raw


def dumps(value: Any, **kwargs: Any) -> str:
    """The standard library's JSON text (its spacing and key order, for files whose bytes
    predate this codec: caches, the gate record, cache keys), non-finite floats as words."""
    return json.dumps(to_builtins(value), allow_nan=False, **kwargs)


def convert(data: Any, type: type[T]) -> T:
    """Plain JSON data into `type`, the words becoming floats again.

    msgspec's lax mode is what reads "nan" into a float field; it also reads "3" as an int,
    "true" as a bool and 3.0 as 3, which a stored file never needs: those are refused as
    strict mode would, naming the field."""
    result = msgspec.convert(data, type, strict=False, dec_hook=_from_hook)
    _only_words_loosened(data, msgspec.to_builtins(result, enc_hook=_hook, str_keys=True), "$")
    return result


def decode(raw: bytes | str, type: type[T]) -> T:
    """JSON text into `type` (msgspec.DecodeError when it is not JSON, ValidationError
    naming the field when it does not fit)."""
    return convert(msgspec.json.decode(raw), type)


def _only_words_loosened(given: Any, got: Any, path: str) -> None:
    if isinstance(given, dict) and isinstance(got, dict):
        for k, v in given.items():
            if k in got:
                _only_words_loosened(v, got[k], f"{path}.{k}")
    elif isinstance(given, (list, tuple)) and isinstance(got, (list, tuple)):
        for i, (v, w) in enumerate(zip(given, got, strict=False)):
            _only_words_loosened(v, w, f"{path}[{i}]")
    elif isinstance(given, str):
        if not isinstance(got, str) and not (given in WORDS and isinstance(got, float)):
            _refuse(got, given, path)
    elif type(given) is not type(got) and not (type(given) is int and type(got) is float):
        _refuse(got, given, path)


def _refuse(got: Any, given: Any, path: str) -> None:
    raise msgspec.ValidationError(
        f"Expected `{type(got).__name__}`, got `{type(given).__name__}` - at `{path}`"
    )
