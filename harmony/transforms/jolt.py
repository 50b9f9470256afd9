# -*- test-case-name: tests.unit.test_jolt -*-
"""
JOLT chains: L{compile_spec} checks a spec once (at startup),
L{transform} applies it.  Pure Python, deterministic, no I/O.

A chain spec is a JSON array of C{{"operation": ..., "spec": ...}}
objects run in order, each on the previous one's output, with the
semantics of the reference Java JOLT (bazaarvoice/jolt 0.1.x):

  - C{shift} (L{harmony.transforms.shift}): literal keys, C{*} and partial
    wildcards (C{rating-*}, C{tag-*-*}), C{a|b}, C{&}-keys; C{&}, C{&n},
    C{&(n,m)} in output paths; C{$}/C{$n}/C{$(n,m)} and C{#literal}
    values; C{@}, C{@n}, C{@name}, C{@(n,path)} on either side; arrays in
    output paths (C{[]}, C{[n]}, C{[&n]}, C{[#n]}, C{[@(n,path)]});
    several output paths (a list); writing to a filled path makes an
    array; numeric keys on input arrays; C{null} values passed through;
    C{null} as a value drops the data; C{\\} escapes.
  - C{default} (L{harmony.transforms.default}): literals, C{*}, C{a|b},
    C{key[]} arrays with index keys; top-level arrays.
  - C{remove} (L{harmony.transforms.remove}): literals, star patterns,
    C{a|b}, array indexes and C{*} on arrays.
  - C{modify-overwrite-beta}, C{modify-default-beta},
    C{modify-define-beta} (L{harmony.transforms.modify}): literal values,
    C{@(n,path)} and C{^context} look-ups, C{=function(...)} with every
    stock function of Java JOLT (C{toLower toUpper concat join split
    substring trim leftPad rightPad min max abs avg intSum doubleSum
    longSum intSubtract doubleSubtract longSubtract divide divideAndRound
    toInteger toDouble toLong toBoolean toString size squashNulls
    recursivelySquashNulls squashDuplicates noop isPresent notNull isNull
    firstElement lastElement elementAt toList sort}) plus C{not}
    (Harmony), fallback lists, C{+}/C{~}/C{_} key prefixes, C{?} keys,
    C{[n]} keys.
  - C{cardinality} (L{harmony.transforms.cardinality}): C{ONE}/C{MANY},
    literals, star patterns, C{@}.
  - C{sort} (L{harmony.transforms.sort}): recursive key sort.

Not implemented, and a L{SpecError} when a spec uses them (never silently
ignored): other C{operation} values (Java class names of custom
transforms, C{modify-define}/C{overwrite} without C{-beta}); functions
other than those listed (Java lets applications register their own);
a chain nested in a chain.

Deliberate differences from Java JOLT, none of which changes the output
of a transform that works in Java: values written are copies (Java lets
two output places share one object); references that can never resolve
(C{&3} one level deep, C{&(0,2)} on a one-star key), array keys on the
left of a shift and unknown functions are spec errors at compile time
(Java throws at run time, accepts silently, or writes nothing); writing
at an output array index of 100000 or more is a L{TransformError};
cardinality also works on values inside arrays and with C{@} at the top,
and modify writes nothing under a scalar (Java throws in these cases);
keys of equal rank apply in spec order (Java: hash order); numbers print
as Java's C{Double.toString} with the shortest round-trip digits.  Each
operation's module lists its own.

Specs written for the Rust Harmony (fluvio-jolt) give the same results
with these exceptions: in fluvio-jolt C{&0} (without parentheses) is
C{&} followed by the text C{0}, here (as in Java JOLT) it is C{&(0)}; and
writing twice to one output path, an error there, makes an array here.
Use C{&(n)} / C{&(n,m)} for specs meant for both.

The C{context} argument of L{transform} is what C{^path} look-ups of
modify specs read (Java JOLT's Chainr context); Harmony's middleware does
not use it.
"""

from harmony.transforms.cardinality import Cardinality
from harmony.transforms.default import Default
from harmony.transforms.errors import SpecError, TransformError
from harmony.transforms.modify import DEFAULT, DEFINE, OVERWRITE, Modify
from harmony.transforms.remove import Remove
from harmony.transforms.shift import Shift
from harmony.transforms.sort import Sort
from harmony.transforms.values import copy_json

#: operation name -> factory of a compiled operation (spec -> object with
#: C{apply(data, context)}).
OPERATIONS = {
    "shift": Shift,
    "default": Default,
    "remove": Remove,
    "modify-overwrite-beta": lambda spec: Modify(spec, OVERWRITE),
    "modify-default-beta": lambda spec: Modify(spec, DEFAULT),
    "modify-define-beta": lambda spec: Modify(spec, DEFINE),
    "cardinality": Cardinality,
    "sort": Sort,
}

#: Operations that need no C{spec}.
_SPECLESS = frozenset({"sort"})

_ENTRY_KEYS = ("operation", "spec")


class CompiledSpec:
    """
    A checked chain, ready for L{transform}.

    @ivar operations: C{(index, name, compiled operation)} in order.
    """

    def __init__(self, operations):
        self.operations = tuple(operations)

    def __repr__(self):
        return f"CompiledSpec({[name for _, name, _ in self.operations]!r})"


def _suggest(name):
    import difflib

    hint = difflib.get_close_matches(name, list(OPERATIONS), n=1, cutoff=0.6)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def compile_spec(spec):
    """
    Check a chain spec and compile it.

    @param spec: a list of C{{"operation": name, "spec": ...}} objects (a
        single such object is accepted as a chain of one).
    @raise SpecError: naming the operation index, its name, and the key
        path inside its C{spec}.
    @return: a L{CompiledSpec}.
    """
    if isinstance(spec, dict) and "operation" in spec:
        spec = [spec]
    if not isinstance(spec, list):
        raise SpecError("a JOLT spec must be an array of {\"operation\": ..., \"spec\": ...} objects")
    if not spec:
        raise SpecError("a JOLT spec must have at least one operation")
    operations = []
    for index, entry in enumerate(spec):
        if not isinstance(entry, dict):
            raise SpecError("expected an object with \"operation\" and \"spec\"", index=index)
        unknown = [key for key in entry if key not in _ENTRY_KEYS]
        name = entry.get("operation")
        if unknown:
            raise SpecError(
                f"unknown key {unknown[0]!r} (an operation has \"operation\" and \"spec\")",
                index=index,
                operation=name if isinstance(name, str) else None,
            )
        if not isinstance(name, str) or not name.strip():
            raise SpecError("\"operation\" must be a non-empty string", index=index)
        factory = OPERATIONS.get(name)
        if factory is None:
            raise SpecError(
                f"unknown operation {name!r}{_suggest(name)}; supported: {', '.join(OPERATIONS)}", index=index
            )
        if "spec" not in entry and name not in _SPECLESS:
            raise SpecError("\"spec\" is missing", index=index, operation=name)
        try:
            compiled = factory(entry.get("spec"))
        except SpecError as e:
            raise e.located(index, name) from None
        except RecursionError:
            raise SpecError("spec is nested too deeply", index=index, operation=name) from None
        operations.append((index, name, compiled))
    return CompiledSpec(operations)


def transform(compiled, data, context=None):
    """
    Apply a chain to C{data} (which is not changed).

    @param compiled: a L{CompiledSpec} (a raw chain spec is compiled
        first).
    @param data: a JSON value (dicts, lists, str, int, float, bool, None).
    @param context: what C{^path} look-ups in modify specs read.
    @raise TransformError: naming the operation that failed.
    @return: the output JSON value.
    """
    if not isinstance(compiled, CompiledSpec):
        compiled = compile_spec(compiled)
    try:
        data = copy_json(data)
    except RecursionError:
        raise TransformError("input is nested too deeply") from None
    for index, name, operation in compiled.operations:
        try:
            data = operation.apply(data, context)
        except TransformError as e:
            raise e.located(index, name) from None
        except RecursionError:
            raise TransformError("input is nested too deeply", index=index, operation=name) from None
    return data
