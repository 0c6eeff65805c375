"""The one bounded decoding layer for everything that comes from the network.

Every JSON message (`round`, `status`, `metrics`, and any message defined later) and the JSON header
of every adapter blob is decoded here, in three bounded steps:

1. size: the payload's length is checked before a byte of it is parsed;
2. shape: the nesting depth is measured by a linear pre-scan (strings stripped, brackets counted), so
   `json.loads` never recurses deeper than `max_depth`; numbers are checked while they are parsed
   (no NaN or Infinity, no float that overflows to infinity, no integer longer than 19 digits),
   duplicate keys are refused, and the text must be strict UTF-8;
3. schema: the decoded value is checked against a declarative schema (`Object`, `Int`, `Float`, `Str`,
   `Array`, `Map`, `Nullable`, `OneOf`, `Const`): exact keys (unknown and missing keys refused), exact
   types (a bool is not an int, a float is not an int), ranges, lengths and patterns.

Every failure raises `WireError` (a `ValueError`) with a reason code and a short detail naming the
field; nothing else escapes, so a caller turns any hostile payload into one rejection with a reason.
A new message is a new `Message(name, Object({...}), max_bytes)`: define it once, next to its
dataclass, and both sides use the same schema to decode (`Message.decode`) and to encode
(`Message.encode` refuses to send what a receiver would refuse).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Pattern, Tuple, Union

import numpy as np

from .errors import FloraError

Payload = Union[bytes, bytearray, memoryview, str]

#: Nesting deeper than this is refused before json.loads sees it (every protocol message needs <= 4).
MAX_DEPTH = 16
#: Integers of more digits are refused while parsing (2**63 has 19 digits; int() of 5,000 digits is slow).
MAX_INT_DIGITS = 19
#: The longest string value or key any schema accepts unless it says otherwise.
MAX_STR = 1024
#: Client ids, federation names, run ids: 1-64 of letters, digits, '_', '-', '.' (no MQTT wildcards).
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HEX64 = re.compile(r"[0-9a-f]{64}")

MALFORMED = "malformed"

# A JSON string, unrolled so that matching is linear; stripping them leaves only structure to count.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_OPEN = (ord("["), ord("{"))


class WireError(FloraError, ValueError):
    """A payload from the network that must be refused: `reason` (a code, `malformed` by default) and `detail`.
    (As a FloraError, an unusable input: exit status 2 where a tool meets one, e.g. a bad --client-id.)"""

    def __init__(self, detail: str, reason: str = MALFORMED) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def short(value: object, limit: int = 32) -> str:
    """repr(value), cut to `limit` characters (a forged payload can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


# -- step 1 and 2: bounded JSON ------------------------------------------------------------------
def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON `text` (what json.loads would recurse to), in
    linear time; an upper bound for text that is not JSON."""
    structure = _NOT_BRACKET.sub("", _STRING.sub("", text))
    opens = sum(structure.count(c) for c in "[{")
    if opens <= 1:
        return opens
    codes = np.frombuffer(structure.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == _OPEN[0]) | (codes == _OPEN[1]), 1, -1).astype(np.int64)
    return max(0, int(np.cumsum(steps).max()))


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise WireError(f"integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"number {short(text)} overflows a float")
    return value


def _parse_constant(text: str) -> Any:
    raise WireError(f"{text} is not a JSON number")


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    obj: Dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise WireError(f"duplicate key {short(key)}")
        obj[key] = value
    return obj


def loads(payload: Payload, max_bytes: int, max_depth: int = MAX_DEPTH, what: str = "message") -> Any:
    """Parse strict, bounded JSON: at most `max_bytes` of UTF-8, nested at most `max_depth` deep, finite
    numbers, integers of at most 19 digits, no duplicate keys; `WireError` for anything else."""
    if len(payload) > max_bytes:
        raise WireError(f"{what} of {len(payload)} bytes is over the limit of {max_bytes}")
    if isinstance(payload, str):
        text = payload
    else:
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise WireError(f"{what} is nested {depth} deep (at most {max_depth})")
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant,
                          object_pairs_hook=_unique_keys)
    except WireError as exc:
        raise WireError(f"{what}: {exc.detail}") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise WireError(f"{what} is not JSON: {short(str(exc), 120)}") from None


def dumps(value: Any) -> bytes:
    """Strict, compact JSON (sorted keys; NaN and infinity refused with ValueError): what senders write."""
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


# -- step 3: schemas -----------------------------------------------------------------------------
class Schema:
    """A type of value; `check(value, path)` returns the value (normalised) or raises WireError."""

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def fail(self, path: str, why: str) -> WireError:
        return WireError(f"{path}: {why}")


@dataclass(frozen=True)
class Int(Schema):
    """A JSON integer (not a bool, not 1.0) in [lo, hi]."""

    lo: int = 0
    hi: int = 2 ** 63 - 1

    def check(self, value: Any, path: str) -> int:
        if type(value) is not int:
            raise self.fail(path, f"{short(value)} is not an integer")
        if not self.lo <= value <= self.hi:
            raise self.fail(path, f"{value} is outside [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Float(Schema):
    """A finite JSON number (integers allowed, returned as float) in [lo, hi]; `gt`: strictly above it."""

    lo: float = -math.inf
    hi: float = math.inf
    gt: Optional[float] = None

    def check(self, value: Any, path: str) -> float:
        if type(value) not in (int, float):
            raise self.fail(path, f"{short(value)} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(path, f"{short(value)} is not finite")
        if not self.lo <= number <= self.hi or (self.gt is not None and not number > self.gt):
            low = f"({self.gt:g}" if self.gt is not None else f"[{self.lo:g}"
            raise self.fail(path, f"{number:g} is outside {low}, {self.hi:g}]")
        return number


@dataclass(frozen=True)
class Str(Schema):
    """A string of at most `max_len` characters (no lone surrogates), optionally one of `choices` or a full
    match of `pattern`."""

    max_len: int = MAX_STR
    pattern: Optional[Pattern[str]] = None
    choices: Optional[Tuple[str, ...]] = None
    min_len: int = 0

    def check(self, value: Any, path: str) -> str:
        if type(value) is not str:
            raise self.fail(path, f"{short(value)} is not a string")
        if not self.min_len <= len(value) <= self.max_len:
            raise self.fail(path, f"string of {len(value)} characters (allowed {self.min_len}-{self.max_len})")
        if self.choices is not None and value not in self.choices:
            raise self.fail(path, f"{short(value)} is not one of {self.choices}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.fail(path, f"{short(value)} does not match {self.pattern.pattern}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(path, "string holds a lone surrogate") from None
        return value


@dataclass(frozen=True)
class Bool(Schema):
    def check(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise self.fail(path, f"{short(value)} is not true or false")
        return value


@dataclass(frozen=True)
class Const(Schema):
    """Exactly `value` (compared with its type: 1 is not True)."""

    value: Any

    def check(self, value: Any, path: str) -> Any:
        if type(value) is not type(self.value) or value != self.value:
            raise self.fail(path, f"{short(value)} is not {self.value!r}")
        return value


@dataclass(frozen=True)
class Nullable(Schema):
    """null, or a value of `inner`."""

    inner: Schema

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)


@dataclass(frozen=True)
class OneOf(Schema):
    """The first of `options` that accepts the value."""

    options: Tuple[Schema, ...]

    def check(self, value: Any, path: str) -> Any:
        errors = []
        for option in self.options:
            try:
                return option.check(value, path)
            except WireError as exc:
                errors.append(exc.detail)
        raise self.fail(path, " / ".join(e.split(": ", 1)[-1] for e in errors))


@dataclass(frozen=True)
class Array(Schema):
    """An array of `min_len`-`max_len` items of `item` (`unique`: no repeats)."""

    item: Schema
    max_len: int
    min_len: int = 0
    unique: bool = False

    def check(self, value: Any, path: str) -> list:
        if type(value) is not list:
            raise self.fail(path, f"{short(value)} is not an array")
        if not self.min_len <= len(value) <= self.max_len:
            raise self.fail(path, f"array of {len(value)} items (allowed {self.min_len}-{self.max_len})")
        out = [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if self.unique and len(set(out)) != len(out):
            raise self.fail(path, "array repeats an item")
        return out


@dataclass(frozen=True)
class Map(Schema):
    """An object of at most `max_len` entries, any keys of `key`, values of `value`."""

    key: Str
    value: Schema
    max_len: int

    def check(self, value: Any, path: str) -> Dict[str, Any]:
        if type(value) is not dict:
            raise self.fail(path, f"{short(value)} is not an object")
        if len(value) > self.max_len:
            raise self.fail(path, f"object of {len(value)} entries (at most {self.max_len})")
        return {self.key.check(k, f"{path} key"): self.value.check(v, f"{path}.{k}") for k, v in value.items()}


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """A key of an `Object`: its schema, and its default when the key may be absent."""

    schema: Schema
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def optional(schema: Schema, default: Any = None) -> Field:
    """A key that may be absent (then `default`)."""
    return Field(schema, default)


@dataclass(frozen=True)
class Object(Schema):
    """An object with exactly these keys (a Schema value is a required key, a `Field` may set a default);
    keys outside `fields` are refused unless `others` (a Map) admits them."""

    fields: Mapping[str, Union[Schema, Field]]
    others: Optional[Map] = None

    def _field(self, key: str) -> Field:
        spec = self.fields[key]
        return spec if isinstance(spec, Field) else Field(spec)

    def check(self, value: Any, path: str) -> Dict[str, Any]:
        if type(value) is not dict:
            raise self.fail(path, f"{short(value)} is not an object")
        extra = {k: v for k, v in value.items() if k not in self.fields}
        if extra and self.others is None:
            raise self.fail(path, f"unknown key {short(sorted(extra)[0])}"
                            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
        out: Dict[str, Any] = {}
        for key in self.fields:
            field = self._field(key)
            if key in value:
                out[key] = field.schema.check(value[key], f"{path}.{key}")
            elif field.required:
                raise self.fail(path, f"missing key {key!r}")
            else:
                out[key] = field.default
        if extra:
            assert self.others is not None
            out.update(self.others.check(extra, path))
        return out


@dataclass(frozen=True)
class Message:
    """A JSON message type: its schema and the byte and depth bounds of one payload."""

    name: str
    schema: Schema
    max_bytes: int
    max_depth: int = MAX_DEPTH

    def decode(self, payload: Payload) -> Any:
        """The checked value of `payload` (defaults filled in), or WireError."""
        return self.schema.check(loads(payload, self.max_bytes, self.max_depth, self.name), self.name)

    def encode(self, value: Any) -> bytes:
        """Strict JSON of `value`, checked against the schema and the size bound first (ValueError if a
        receiver would refuse it: a sender's bug)."""
        self.schema.check(value, self.name)
        payload = dumps(value)
        if len(payload) > self.max_bytes:
            raise WireError(f"{self.name} of {len(payload)} bytes is over the limit of {self.max_bytes}")
        return payload
