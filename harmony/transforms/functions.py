# -*- test-case-name: tests.unit.test_jolt -*-
"""
The functions of C{modify-*-beta} specs (Java JOLT's stock functions),
with Java JOLT's argument conventions.

A function gets the evaluated arguments (C{=f(@(1,a), 'x', 3)}) or, when
written without parentheses (C{=toUpper}), the current value.  It returns
a value or L{MISSING} (nothing is written then).  Families:

  - I{single} functions (C{toUpper}, C{toInteger}, C{abs}, ...) apply to
    one value, or to each element of an array (elements they cannot
    convert are kept as they are);
  - I{list} functions (C{concat}, C{avg}, C{firstElement}, ...) take an
    array or several arguments; a single non-array value gives nothing;
  - I{argument-driven} functions (C{join}, C{split}, C{leftPad},
    C{elementAt}, C{divideAndRound}) take their special first argument
    (separator, index, ...) then the values;
  - C{null} (or no value) as the only argument gives nothing.

Numbers follow Java: integers within 32 bits are C{Integer}, larger ones
C{Long}, decimals C{Double}; strings are numbers when Java's
C{Integer.parseInt}, C{Long.parseLong} or C{Double.parseDouble} accepts
them.  C{=not} is a Harmony addition (not in Java JOLT): C{true} <->
C{false}, also for the strings C{"true"}/C{"false"}.
"""

import math
import re
from decimal import ROUND_HALF_UP, Context, Decimal

from harmony.transforms.values import (
    INT_MAX,
    INT_MIN,
    LONG_MAX,
    LONG_MIN,
    MISSING,
    int_value,
    is_number,
    java_str,
    java_trim,
    java_type,
    long_value,
    to_number,
    utf16_key,
    wrap_int,
    wrap_long,
)

# -- function families --------------------------------------------------------------


class Function:
    def __call__(self, *args):
        raise NotImplementedError


class Base(Function):
    """
    One value -> C{single(value)}; an array or several values ->
    C{many(list)}; nothing, C{null} or C{[]} -> L{MISSING}.
    """

    def __call__(self, *args):
        if not args:
            return MISSING
        if len(args) == 1:
            arg = args[0]
            if isinstance(arg, list):
                return self.many(arg) if arg else MISSING
            if arg is None:
                return MISSING
            return self.single(arg)
        return self.many(list(args))

    def single(self, arg):
        return MISSING

    def many(self, args):
        return MISSING


class Single(Base):
    """
    Applies C{fn} to one value or to each element.
    """

    def __init__(self, fn):
        self.single = fn

    def many(self, args):
        out = []
        for arg in args:
            value = self.single(arg)
            out.append(arg if value is MISSING else value)
        return out


class Many(Base):
    def __init__(self, fn):
        self.many = fn


class ArgDriven(Function):
    """
    C{f(special, value)} -> C{single(special, value)} (or
    C{many(special, value)} for an array value); C{f(special, a, b, ...)}
    -> C{many(special, [a, b, ...])}.  A single array argument is spread.
    """

    def __init__(self, special_type, single=None, many=None, each=False):
        self.special_type = special_type
        self._single = single
        self._many = many
        self.each = each

    def single(self, special, arg):
        return self._single(special, arg) if self._single else MISSING

    def many(self, special, args):
        if self.each:
            out = []
            for arg in args:
                value = self.single(special, arg)
                out.append(arg if value is MISSING else value)
            return out
        return self._many(special, args) if self._many else MISSING

    def __call__(self, *args):
        if len(args) == 1 and isinstance(args[0], list):
            args = tuple(args[0])
        if len(args) < 2 or java_type(args[0]) != self.special_type:
            return MISSING
        special = args[0]
        if len(args) == 2:
            if isinstance(args[1], list):
                return self.many(special, args[1])
            return self.single(special, args[1])
        return self.many(special, list(args[1:]))


class Squash(Function):
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        if not args:
            return MISSING
        if len(args) == 1:
            arg = args[0]
            if isinstance(arg, list) and not arg:
                return MISSING
            if arg is None:
                return MISSING
            return self.fn(arg)
        return self.fn(list(args))


class Raw(Function):
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


# -- conversions ------------------------------------------------------------------------


def to_integer(arg):
    if is_number(arg):
        return int_value(arg)
    if isinstance(arg, str):
        number = to_number(arg)
        return MISSING if number is MISSING else int_value(number)
    return MISSING


def to_long(arg):
    if is_number(arg):
        return long_value(arg)
    if isinstance(arg, str):
        number = to_number(arg)
        return MISSING if number is MISSING else long_value(number)
    return MISSING


def to_double(arg):
    if is_number(arg):
        return float(arg)
    if isinstance(arg, str):
        number = to_number(arg)
        return MISSING if number is MISSING else float(number)
    return MISSING


def to_boolean(arg):
    if isinstance(arg, bool):
        return arg
    if isinstance(arg, str):
        if arg.lower() == "true":
            return True
        if arg.lower() == "false":
            return False
    return MISSING


def to_string(arg):
    return java_str(arg)


def negate(arg):
    value = to_boolean(arg)
    return MISSING if value is MISSING else not value


# -- strings -----------------------------------------------------------------------------


def _string_fn(fn):
    return lambda arg: fn(arg) if isinstance(arg, str) else MISSING


def concat(args):
    return "".join(java_str(arg) for arg in args if arg is not None)


def join(separator, args):
    out = []
    last = len(args) - 1
    for i, arg in enumerate(args):
        if arg is not None:
            text = java_str(arg)
            if text != "":
                out.append(text)
                if i < last:
                    out.append(separator)
    return "".join(out)


def java_split(text, regex):
    """
    Java's C{String.split(regex)}: trailing empty strings removed, no
    leading empty string for a zero-width match at the start.
    """
    parts, index, matched = [], 0, False
    for m in re.finditer(regex, text):
        if index == 0 and m.start() == 0 and m.end() == 0:
            continue
        matched = True
        parts.append(text[index : m.start()])
        index = m.end()
    if not matched:
        return [text]
    parts.append(text[index:])
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def split(separator, source):
    if source is None or separator is None or not isinstance(source, str):
        return MISSING
    return java_split(source, separator)


def substring(args):
    if len(args) != 3:
        return MISSING
    text, start, end = args
    if not (isinstance(text, str) and java_type(start) == "Integer" and java_type(end) == "Integer"):
        return MISSING
    if start >= end or start < 0 or end < 1 or end > len(text):
        return MISSING
    return text[start:end]


def _pad(left):
    def pad(source, args):
        width, filler = args[0], args[1]
        if java_type(width) != "Integer" or not isinstance(filler, str):
            return MISSING
        if width <= 0 or width > 500 or len(filler) != 1:
            return MISSING
        if width <= len(source):
            return source
        padding = filler * (width - len(source))
        return padding + source if left else source + padding

    return pad


# -- math --------------------------------------------------------------------------------

_DOUBLE_MAX = 1.7976931348623157e308


def _java_max(a, b):
    return math.nan if a != a or b != b else max(a, b)


def _java_min(a, b):
    return math.nan if a != a or b != b else min(a, b)


def _extreme(args, pick, ints, doubles, longs, better):
    found = False
    for arg in args:
        kind = java_type(arg)
        if kind == "String":
            arg = to_number(arg)
            if arg is MISSING:
                continue
            kind = java_type(arg)
        if kind == "Integer":
            ints = pick(ints, arg)
        elif kind == "Double":
            doubles = pick(doubles, arg)
        elif kind == "Long":
            longs = pick(longs, arg)
        else:
            continue
        found = True
    if not found:
        return MISSING
    as_long = long_value(doubles)
    if better(ints, as_long) and better(ints, longs):
        return ints
    if better(longs, as_long):
        return longs
    return doubles


def maximum(args):
    return _extreme(args, _java_max, INT_MIN, -_DOUBLE_MAX, LONG_MIN, lambda a, b: a >= b)


def minimum(args):
    return _extreme(args, _java_min, INT_MAX, _DOUBLE_MAX, LONG_MAX, lambda a, b: a <= b)


def _number_or_missing(arg):
    return arg if is_number(arg) else MISSING


def absolute(arg):
    kind = java_type(arg)
    if kind == "Integer":
        return wrap_int(abs(arg))
    if kind == "Long":
        return wrap_long(abs(arg))
    if kind == "Double":
        return abs(arg)
    if kind == "String":
        number = to_number(arg)
        return MISSING if number is MISSING else absolute(number)
    return MISSING


def average(args):
    total, count = 0.0, 0
    for arg in args:
        number = to_number(arg)
        if number is not MISSING:
            total += float(number)
            count += 1
    return MISSING if count == 0 else total / count


def int_sum(args):
    total = 0
    for arg in args:
        value = to_integer(arg)
        if value is not MISSING:
            total = wrap_int(total + value)
    return total


def double_sum(args):
    total = 0.0
    for arg in args:
        value = to_double(arg)
        if value is not MISSING:
            total += value
    return total


def long_sum(args):
    total = 0
    for arg in args:
        value = to_long(arg)
        if value is not MISSING:
            total = wrap_long(total + value)
    return total


def _subtract(kind, wrap):
    def subtract(args):
        if len(args) != 2 or java_type(args[0]) != kind or java_type(args[1]) != kind:
            return MISSING
        return wrap(args[0] - args[1])

    return subtract


def divide(args):
    if len(args) != 2:
        return MISSING
    numerator, denominator = to_number(args[0]), to_number(args[1])
    if numerator is MISSING or denominator is MISSING:
        return MISSING
    if float(denominator) == 0:
        return MISSING
    return float(numerator) / float(denominator)


_DECIMAL = Context(prec=1000)


def divide_and_round(digits, args):
    result = divide(args)
    if result is MISSING or result != result or math.isinf(result):
        return MISSING
    exact = Decimal(result)
    rounded = exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP, context=_DECIMAL)
    return float(rounded)


# -- objects and lists -------------------------------------------------------------------


def size(*args):
    if not args:
        return MISSING
    if len(args) == 1:
        arg = args[0]
        if isinstance(arg, (list, str, dict)):
            return len(arg)
        return MISSING
    return len(args)


def squash_nulls(value):
    if isinstance(value, list):
        value[:] = [v for v in value if v is not None]
    elif isinstance(value, dict):
        for key in [k for k, v in value.items() if v is None]:
            del value[key]
    return value


def recursively_squash_nulls(value):
    squash_nulls(value)
    children = value if isinstance(value, list) else value.values() if isinstance(value, dict) else ()
    for child in children:
        recursively_squash_nulls(child)
    return value


def _identity(value):
    kind = java_type(value)
    if kind == "Map":
        return (kind, frozenset((k, _identity(v)) for k, v in value.items()))
    if kind == "List":
        return (kind, tuple(_identity(v) for v in value))
    return (kind, value)


def squash_duplicates(value):
    if not isinstance(value, list):
        return value
    seen, out = set(), []
    for item in value:
        key = _identity(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def first_element(args):
    return args[0] if args else MISSING


def last_element(args):
    return args[-1] if args else MISSING


def element_at(index, args):
    if index < 0 or index >= len(args):
        return MISSING
    return args[index]


class _ToList(Base):
    def single(self, arg):
        return [arg]

    def many(self, args):
        return args


class _Sort(Base):
    """
    Java's C{Arrays.sort}: all elements of one comparable type, else
    nothing.
    """

    def single(self, arg):
        return arg

    def many(self, args):
        if len(args) == 1:
            return list(args)
        kinds = {java_type(a) for a in args}
        if len(kinds) != 1:
            return MISSING
        kind = kinds.pop()
        if kind == "String":
            return sorted(args, key=utf16_key)
        if kind in ("Integer", "Long", "Double", "Boolean"):
            if kind == "Double" and any(a != a for a in args):
                return sorted(args, key=lambda a: (a != a, a))
            return sorted(args)
        return MISSING


def _is_present(*args):
    return args[0] if args else MISSING


def _not_null(*args):
    return args[0] if args and args[0] is not None else MISSING


def _is_null(*args):
    return args[0] if args and args[0] is None else MISSING


FUNCTIONS = {
    "toLower": Single(_string_fn(str.lower)),
    "toUpper": Single(_string_fn(str.upper)),
    "trim": Single(_string_fn(java_trim)),
    "concat": Many(concat),
    "join": ArgDriven("String", many=join),
    "split": ArgDriven("String", single=split, each=True),
    "substring": Many(substring),
    "leftPad": ArgDriven("String", many=_pad(True)),
    "rightPad": ArgDriven("String", many=_pad(False)),
    "min": Base(),
    "max": Base(),
    "abs": Single(absolute),
    "avg": Many(average),
    "intSum": Many(int_sum),
    "doubleSum": Many(double_sum),
    "longSum": Many(long_sum),
    "intSubtract": Many(_subtract("Integer", wrap_int)),
    "doubleSubtract": Many(_subtract("Double", float)),
    "longSubtract": Many(_subtract("Long", wrap_long)),
    "divide": Many(divide),
    "divideAndRound": ArgDriven("Integer", many=divide_and_round),
    "toInteger": Single(to_integer),
    "toDouble": Single(to_double),
    "toLong": Single(to_long),
    "toBoolean": Single(to_boolean),
    "toString": Single(to_string),
    "not": Single(negate),
    "size": Raw(size),
    "squashNulls": Squash(squash_nulls),
    "recursivelySquashNulls": Squash(recursively_squash_nulls),
    "squashDuplicates": Squash(squash_duplicates),
    "noop": Raw(lambda *args: MISSING),
    "isPresent": Raw(_is_present),
    "notNull": Raw(_not_null),
    "isNull": Raw(_is_null),
    "firstElement": Many(first_element),
    "lastElement": Many(last_element),
    "elementAt": ArgDriven("Integer", many=element_at),
    "toList": _ToList(),
    "sort": _Sort(),
}

FUNCTIONS["min"].single = _number_or_missing
FUNCTIONS["min"].many = minimum
FUNCTIONS["max"].single = _number_or_missing
FUNCTIONS["max"].many = maximum
