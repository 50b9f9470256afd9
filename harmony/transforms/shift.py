# -*- test-case-name: tests.unit.test_jolt -*-
"""
C{shift} (Java JOLT's Shiftr): copy data from input paths to output paths.

The spec mirrors the input tree; each leaf names where the matched data
goes (a dotted path, a list of paths to copy it to several places, or
C{null} to drop it).  Left-hand keys: literals, C{*} and star patterns,
C{a|b} alternatives, C{&}-keys, C{$}/C{$n}/C{$(n,m)} (the matched key as
data), C{#literal} (a literal as data), C{@} (the value at this level),
C{@(n,path)} (a value from up the tree).  Right-hand paths: C{&},
C{&n}, C{&(n,m)}, C{@(n,path)}, C{[]}, C{[n]}, C{[&n]}, C{[#n]}.

Matching order at each level (as in Java JOLT): C{@}, C{$}, C{#} and
C{@(...)} keys always run first and never block anything; then an input
key goes to its literal spec key if there is one, else to the first
computed key that matches: C{&}-keys, then star patterns with three or
more stars, two stars, one star, then C{*}; within a kind the longer key
first, then alphabetically.  Input arrays are objects with keys C{"0"},
C{"1"}, ...; a scalar value is matched as a key (C{"hidden": {"true":
{"#on": "x"}}}).

Writing to a path that already holds a value makes an array of both
(Java JOLT; the Rust Harmony's engine reported an error instead).  A
C{null} input value is written as C{null}.  Nothing written at all gives
C{null}.

Differences from Java JOLT (deliberate):

  - written values are copies: two output paths never share one object
    (Java shares, so a later operation changing one changed both);
  - array keys on the left (C{"[1]"}) are a spec error (Java accepts them
    and never matches; use C{"1"});
  - a reference that cannot resolve (C{&3} two levels deep, C{&(0,2)} on
    a one-star key) is a spec error at compile time (Java throws when
    the reference is reached);
  - writing at an output array index of 100000 or more is a transform
    error (a key taken from the input must not allocate a huge array).
"""

from harmony.transforms import strategies
from harmony.transforms.errors import SpecError
from harmony.transforms.paths import (
    Amp,
    ArrayElement,
    At,
    Dollar,
    Hash,
    Literal,
    MatchedElement,
    OutputPath,
    Step,
    Transpose,
    level_groups,
    parse_key,
    split_alternatives,
)
from harmony.transforms.values import MISSING, copy_json, is_blank

_ORDER = {"amp": 1, "star_regex": 2, "star_double": 3, "star_single": 4, "star_all": 5}
_sort_key = strategies.computed_sort_key(_ORDER)

ROOT = "root"


def _build_children(spec, scope, where):
    children, seen = [], set()
    for raw, rhs in spec.items():
        if not isinstance(raw, str):
            raise SpecError(f"keys must be strings, got {raw!r}", where)
        for key in split_alternatives(raw):
            child_where = where + (raw,)
            if isinstance(rhs, dict):
                child = Composite(key, rhs, scope, child_where)
            else:
                child = Leaf(key, rhs, scope, child_where)
            canonical = child.element.canonical
            if canonical in seen:
                raise SpecError(f"duplicate key {canonical!r} (after expanding '|')", child_where)
            seen.add(canonical)
            children.append(child)
    return children


def _element(key, scope, where):
    element = parse_key(key, where)
    if isinstance(element, ArrayElement):
        raise SpecError(
            f"array key {key!r} is not valid on the left of a shift spec; input arrays are matched by"
            " index keys such as \"0\"",
            where,
        )
    element.check(scope, where)
    return element


class Composite:
    """
    A spec key whose value is an object: walk one level down.
    """

    def __init__(self, key, spec, scope, where):
        self.element = _element(key, scope, where)
        if isinstance(self.element, At):
            raise SpecError("'@' key can not have children", where)
        if isinstance(self.element, Dollar):
            raise SpecError("'$' key can not have children", where)
        children = _build_children(spec, scope + (level_groups(self.element, scope),), where)
        if not children:
            raise SpecError("an empty object {} is not a valid shift spec value", where)
        self.special, self.literals, computed = [], {}, []
        for child in children:
            element = child.element
            if isinstance(element, Literal):
                self.literals[element.raw_key] = child
            elif isinstance(element, (At, Hash, Dollar, Transpose)):
                self.special.append(child)
            else:
                computed.append(child)
        computed.sort(key=_sort_key)
        self.computed = computed
        self.strategy = self._strategy()

    def _strategy(self):
        if not self.computed:
            return strategies.AVAILABLE_LITERALS
        if not self.literals:
            return strategies.COMPUTED
        for child in self.computed:
            if isinstance(child.element, Amp):
                return strategies.CONFLICT
            if any(child.element.string_match(literal) for literal in self.literals):
                return strategies.CONFLICT
        return strategies.AVAILABLE_LITERALS_WITH_COMPUTED

    def apply(self, key, value, walked, output, context):
        matched = self.element.match(key, walked)
        if matched is None:
            return False
        if isinstance(self.element, Transpose):
            value = self.element.object_evaluate(walked)
            if value is MISSING:
                return False
        walked.append(Step(None if value is MISSING else value, matched))
        for child in self.special:
            child.apply(key, value, walked, output, context)
        strategies.process(self.strategy, self, value, walked, output, context)
        walked.pop()
        walked[-1].matched.hash_count += 1
        return True


class Leaf:
    """
    A spec key whose value is an output path, a list of them, or C{null}.
    """

    def __init__(self, key, rhs, scope, where):
        self.element = element = _element(key, scope, where)
        write_scope = scope + (level_groups(element, scope),)
        if isinstance(rhs, str):
            paths = [rhs]
        elif isinstance(rhs, list):
            paths = rhs
        elif rhs is None:
            paths = []
        else:
            raise SpecError(
                f"invalid shift value {rhs!r}: expected an object, an output path, a list of paths or null", where
            )
        self.writers = []
        for i, path in enumerate(paths):
            path_where = where + (i,) if isinstance(rhs, list) else where
            if not isinstance(path, str):
                raise SpecError(f"an output path must be a string, got {path!r}", path_where)
            writer = OutputPath(ROOT if is_blank(path) else ROOT + "." + path, path_where, display=path)
            writer.check(write_scope, path_where)
            self.writers.append(writer)
        if isinstance(element, (Dollar, Hash)):
            self.data = "key"
        elif isinstance(element, At):
            self.data = "input"
        elif isinstance(element, Transpose):
            self.data = "lookup"
        else:
            self.data = "match"

    def apply(self, key, value, walked, output, context):
        data_in = None if value is MISSING else value
        matched = self.element.match(key, walked)
        if matched is None:
            return False
        kind = self.data
        if kind == "key":
            data = matched.raw_key
        elif kind == "lookup":
            data = self.element.object_evaluate(walked)
            if data is MISSING:
                return False
        else:
            data = data_in
        walked.append(Step(data_in, matched))
        for writer in self.writers:
            writer.write(output, copy_json(data), walked)
        walked.pop()
        if kind == "match":
            walked[-1].matched.hash_count += 1
            return True
        return False


class Shift:
    """
    A compiled shift spec.
    """

    def __init__(self, spec):
        if not isinstance(spec, dict):
            raise SpecError(f"a shift spec must be an object, got {_kind(spec)}")
        self.root = Composite(ROOT, spec, (0,), ())

    def apply(self, data, context=None):
        output = {}
        walked = [Step(data, MatchedElement(ROOT))]
        self.root.apply(ROOT, data, walked, output, context)
        return output.get(ROOT)


def _kind(value):
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
