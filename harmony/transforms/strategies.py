# -*- test-case-name: tests.unit.test_jolt -*-
"""
How a composite spec node (Shiftr, Modifier) applies its children to the
input at its level: Java JOLT's C{ExecutionStrategy}.

A node has I{literal} children (exact keys, tried first) and I{computed}
children (wildcards, tried in priority order until one matches).  Input
objects are walked in input order, arrays by index (keys C{"0"},
C{"1"}, ...), and a scalar is matched as if it were a key (so
C{"rating": {"5": ...}} fires on C{"rating": 5}; the child sees no value).

  - C{AVAILABLE_LITERALS}: only literal children; each is applied when the
    input has its key (in spec order).
  - C{ALL_LITERALS}: as above, but applied even when the key is missing
    (Modifier: it may create the key).
  - C{COMPUTED}: only computed children.
  - C{CONFLICT}: per input key, the literal child, else the first computed
    child that matches.
  - C{AVAILABLE_LITERALS_WITH_COMPUTED} / C{ALL_LITERALS_WITH_COMPUTED}:
    no computed child can match a literal key, so both sets run.

Each child has C{apply(key, value, walked, output, context)} returning
whether it matched; C{value} is L{MISSING} when there is no value.
"""

from harmony.transforms.values import MISSING, java_str, parse_java_int, utf16_key

AVAILABLE_LITERALS = "available_literals"
ALL_LITERALS = "all_literals"
COMPUTED = "computed"
CONFLICT = "conflict"
AVAILABLE_LITERALS_WITH_COMPUTED = "available_literals_with_computed"
ALL_LITERALS_WITH_COMPUTED = "all_literals_with_computed"


def process(strategy, node, value, walked, output, context):
    """
    Apply C{node}'s children to C{value} (the input at C{node}'s level).
    """
    if value is MISSING or value is None:
        return
    if isinstance(value, dict):
        _PROCESS[strategy][0](node, value, walked, output, context)
    elif isinstance(value, list):
        _PROCESS[strategy][1](node, value, walked, output, context)
    else:
        _PROCESS[strategy][2](node, java_str(value), walked, output, context)


def _apply_computed(node, key, value, walked, output, context):
    for child in node.computed:
        if child.apply(key, value, walked, output, context):
            break


def _apply_literal_or_computed(node, key, value, walked, output, context):
    child = node.literals.get(key)
    if child is not None:
        child.apply(key, value, walked, output, context)
    else:
        _apply_computed(node, key, value, walked, output, context)


def _index(key):
    try:
        return parse_java_int(key)
    except ValueError:
        return None


def _element(items, index, orig_size):
    value = items[index]
    if value is None and orig_size is not None and index >= orig_size:
        return MISSING
    return value


# AVAILABLE_LITERALS


def _available_map(node, mapping, walked, output, context):
    for key, child in node.literals.items():
        if key in mapping:
            child.apply(key, mapping[key], walked, output, context)


def _available_list(node, items, walked, output, context):
    orig_size = walked[-1].matched.orig_size
    for key, child in node.literals.items():
        index = _index(key)
        if index is not None and 0 <= index < len(items):
            child.apply(key, _element(items, index, orig_size), walked, output, context)


def _literal_scalar(node, key, walked, output, context):
    child = node.literals.get(key)
    if child is not None:
        child.apply(key, MISSING, walked, output, context)


# ALL_LITERALS


def _all_map(node, mapping, walked, output, context):
    for key, child in node.literals.items():
        child.apply(key, mapping.get(key, MISSING), walked, output, context)


def _all_list(node, items, walked, output, context):
    orig_size = walked[-1].matched.orig_size
    for key, child in node.literals.items():
        index = _index(key)
        value = MISSING
        if index is not None and 0 <= index < len(items):
            element = items[index]
            if element is not None or orig_size is None or index < orig_size:
                value = element
        child.apply(key, value, walked, output, context)


# COMPUTED


def _computed_map(node, mapping, walked, output, context):
    for key, value in list(mapping.items()):
        _apply_computed(node, key, value, walked, output, context)


def _computed_list(node, items, walked, output, context):
    orig_size = walked[-1].matched.orig_size
    index = 0
    while index < len(items):
        _apply_computed(node, str(index), _element(items, index, orig_size), walked, output, context)
        index += 1


def _computed_scalar(node, key, walked, output, context):
    _apply_computed(node, key, MISSING, walked, output, context)


# CONFLICT


def _conflict_map(node, mapping, walked, output, context):
    for key, value in list(mapping.items()):
        _apply_literal_or_computed(node, key, value, walked, output, context)


def _conflict_list(node, items, walked, output, context):
    orig_size = walked[-1].matched.orig_size
    index = 0
    while index < len(items):
        _apply_literal_or_computed(node, str(index), _element(items, index, orig_size), walked, output, context)
        index += 1


def _conflict_scalar(node, key, walked, output, context):
    _apply_literal_or_computed(node, key, MISSING, walked, output, context)


def _both(first, second):
    def run(*args):
        first(*args)
        second(*args)

    return run


_PROCESS = {
    AVAILABLE_LITERALS: (_available_map, _available_list, _literal_scalar),
    ALL_LITERALS: (_all_map, _all_list, _literal_scalar),
    COMPUTED: (_computed_map, _computed_list, _computed_scalar),
    CONFLICT: (_conflict_map, _conflict_list, _conflict_scalar),
    AVAILABLE_LITERALS_WITH_COMPUTED: (
        _both(_available_map, _computed_map),
        _both(_available_list, _computed_list),
        _both(_literal_scalar, _computed_scalar),
    ),
    ALL_LITERALS_WITH_COMPUTED: (
        _both(_all_map, _computed_map),
        _both(_all_list, _computed_list),
        _both(_literal_scalar, _computed_scalar),
    ),
}


def computed_sort_key(order):
    """
    Java JOLT's C{ComputedKeysComparator}: by kind (C{order}: element kind
    -> rank), then longest canonical form first, then alphabetically.
    """

    def key(child):
        units = utf16_key(child.element.canonical)
        return (order[child.element.kind], -len(units), units)

    return key
