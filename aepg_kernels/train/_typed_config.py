"""Dataclasses from plain dicts (parsed YAML), type-checked against their annotations: unknown
keys are rejected with the list of valid ones, values are checked (and YAML's float strings read)
per type, and every error names its dotted key.

Supported annotations: Any, Optional/Union with None, Literal, nested dataclasses, List, Tuple
(fixed length), Dict, float (int and float strings accepted) and exact scalar types (bool is
never taken for an int, nor the reverse).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Dict, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against (and converted to) the annotation `tp`; `key` names it in errors."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            require(type(None) in args, key, "must not be null")
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key)
    if origin is Literal:
        require(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        require(isinstance(value, dict), key, f"must be a mapping of {', '.join(_fields(tp))}, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        if origin is tuple:
            require(len(value) == len(args), key, f"must have {len(args)} items, got {value!r}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        # YAML 1.1 reads `5e-4` (no dot) as a string: accept any float literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a float, got {value!r}")
        return float(value)
    # bool is an int subclass: never accept one for the other.
    require(type(value) is tp, key, f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _fields(cls) -> Dict[str, Any]:
    return get_type_hints(cls)


def build_dataclass(cls, values: dict, prefix: str = ""):
    """`cls(**values)`, each value coerced to its field's annotation; `prefix` is the dotted key of
    this section (empty at the top)."""
    hints = _fields(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(hints)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a section whose post-init check fails on a type we let through
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_plain(value: Any) -> Any:
    """Plain dicts and lists (tuples become lists) all the way down."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
