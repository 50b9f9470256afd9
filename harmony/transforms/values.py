# -*- test-case-name: tests.unit.test_jolt -*-
"""
JSON values seen the way the reference Java JOLT sees them.

Java JOLT runs on Jackson's view of JSON: numbers are C{Integer} (32-bit),
C{Long} (64-bit) or C{Double}; C{toString()} spells them the Java way
(C{5.0}, C{1.0E10}); string comparisons use UTF-16 code units.  The
helpers here give Python values the same types and spellings, so that
keys matched against scalars (C{"5.0"}), function results (C{=toString},
C{=concat}) and sorting agree with Java.

L{MISSING} stands for Java JOLT's empty C{Optional} (a key that is not
there), as opposed to C{None} (a JSON C{null} that is there).
"""

import math
import re
from decimal import Decimal


class _Missing:
    __slots__ = ()

    def __repr__(self):
        return "MISSING"

    def __bool__(self):
        return False


#: An absent value (Java JOLT's C{Optional.empty()}).
MISSING = _Missing()

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1

_INT = re.compile(r"[+-]?[0-9]+\Z")
_DOUBLE = re.compile(r"[+-]?(NaN|Infinity|(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?))[fFdD]?\Z")


def java_type(value):
    """
    The Java class Jackson would give C{value}: C{"Integer"}, C{"Long"},
    C{"BigInteger"}, C{"Double"}, C{"Boolean"}, C{"String"}, C{"Map"},
    C{"List"}, or C{None} for C{null}.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "Boolean"
    if isinstance(value, int):
        if INT_MIN <= value <= INT_MAX:
            return "Integer"
        if LONG_MIN <= value <= LONG_MAX:
            return "Long"
        return "BigInteger"
    if isinstance(value, float):
        return "Double"
    if isinstance(value, str):
        return "String"
    if isinstance(value, dict):
        return "Map"
    if isinstance(value, list):
        return "List"
    return type(value).__name__


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wrap_int(value):
    """
    C{value} wrapped to 32 bits (Java C{int} arithmetic).
    """
    return (value - INT_MIN) % 2**32 + INT_MIN


def wrap_long(value):
    return (value - LONG_MIN) % 2**64 + LONG_MIN


def _saturate(value, low, high):
    if value != value:
        return 0
    if value >= high:
        return high
    if value <= low:
        return low
    return int(value)


def int_value(number):
    """
    Java C{Number.intValue()}: a double is truncated and saturated, a long
    wrapped.
    """
    if isinstance(number, float):
        return _saturate(number, INT_MIN, INT_MAX)
    return wrap_int(number)


def long_value(number):
    if isinstance(number, float):
        return _saturate(number, LONG_MIN, LONG_MAX)
    return wrap_long(number)


def parse_java_int(text, low=INT_MIN, high=INT_MAX):
    """
    Java C{Integer.parseInt} (ASCII digits, optional sign).

    @raise ValueError: not an integer, or out of range.
    """
    if not isinstance(text, str) or not _INT.match(text):
        raise ValueError(f"not an integer: {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"out of range: {text!r}")
    return value


def _parse_double(text):
    stripped = text.strip("".join(chr(i) for i in range(33)))
    if not _DOUBLE.match(stripped):
        raise ValueError(text)
    body = stripped.rstrip("fFdD")
    if body.lstrip("+-") == "NaN":
        return math.nan
    if body.lstrip("+-") == "Infinity":
        return -math.inf if body.startswith("-") else math.inf
    return float(body)


def to_number(value):
    """
    Java JOLT's C{Objects.toNumber}: a number as is; a string parsed as an
    C{Integer}, else a C{Long}, else a C{Double}; anything else L{MISSING}.
    """
    if is_number(value):
        return value
    if isinstance(value, str):
        for low, high in ((INT_MIN, INT_MAX), (LONG_MIN, LONG_MAX)):
            try:
                return parse_java_int(value, low, high)
            except ValueError:
                pass
        try:
            return _parse_double(value)
        except ValueError:
            return MISSING
    return MISSING


def _double_str(x):
    if x != x:
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    shortest = Decimal(repr(x))
    if 1e-3 <= abs(x) < 1e7:
        text = format(shortest, "f")
        return text if "." in text else text + ".0"
    sign, digits, exponent = shortest.as_tuple()
    text = "".join(map(str, digits))
    exp10 = exponent + len(text) - 1
    text = text.rstrip("0") or "0"
    mantissa = text[0] + "." + (text[1:] or "0")
    return ("-" if sign else "") + mantissa + "E" + str(exp10)


def java_str(value):
    """
    Java's C{String.valueOf} of a JSON value: C{null}, C{true}, C{5},
    C{5.0}, C{1.0E10}, C{[a, b]}, C{{k=v}}.
    """
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _double_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(java_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={java_str(v)}" for k, v in value.items()) + "}"
    return str(value)


def java_trim(text):
    """
    Java C{String.trim()}: strips characters up to U+0020 only.
    """
    return text.strip("".join(chr(i) for i in range(33)))


def utf16_key(text):
    """
    A sort key ordering strings like Java's C{String.compareTo} (UTF-16
    code units).
    """
    return text.encode("utf-16-be", "surrogatepass")


def copy_json(value):
    """
    A deep copy of a JSON value (dicts, lists, scalars).
    """
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value


def is_blank(text):
    return not text or text.isspace()
