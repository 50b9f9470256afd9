# -*- test-case-name: tests.unit.test_jolt -*-
"""
C{modify-overwrite-beta}, C{modify-default-beta}, C{modify-define-beta}
(Java JOLT's Modifier): compute values in place.

The spec mirrors the input.  A leaf value is:

  - a literal (written as is; strings not starting with C{=}, C{@} or
    C{^} are literals too);
  - C{"@(n,path)"}: the value found there;
  - C{"^path"}: a value from the transform's context (L{transform}'s
    C{context} argument; none in Harmony's middleware);
  - C{"=fn"}: function C{fn} of the current value; C{"=fn(a, b, ...)"}:
    of the arguments, each a C{@(n,path)} look-up, a C{^path}, a quoted
    C{'string'}, C{true}/C{false}, a number, or a bare string;
  - a list of the above: the first one that gives a value wins.

When a value is found it is written: C{overwrite} always, C{default} only
where the key is missing or C{null}, C{define} only where the key is
missing.  A key prefix C{+} / C{~} / C{_} switches that one key to
overwrite / default / define.  A key suffix C{?} applies the key only if
the input has it.  Objects walked into are created when missing (subject
to the same mode).  Keys: literals, C{*} and star patterns, C{a|b},
explicit array indexes C{[1]} (the array is padded with C{null}s to the
highest index); array and object keys can not be mixed in one object.

Functions: see L{harmony.transforms.functions}; an unknown function name
is a spec error (Java JOLT silently writes nothing).

Differences from Java JOLT: values written are copies (no sharing between
places); a leaf whose parent is neither an object nor an array (a scalar
walked into with C{*}) writes nothing (Java throws); star groups stay
available (C{&(0,1)}) on levels whose value is an array (Java loses
them and throws).
"""

from harmony.transforms import strategies
from harmony.transforms.errors import SpecError
from harmony.transforms.functions import FUNCTIONS
from harmony.transforms.paths import (
    ArrayElement,
    Literal,
    MatchedElement,
    OutputPath,
    Star,
    StarAll,
    Step,
    Transpose,
    level_groups,
    parse_key,
    split_alternatives,
)
from harmony.transforms.values import MISSING, copy_json, is_blank, parse_java_int, to_number

OVERWRITE, DEFAULT, DEFINE = "overwrite", "default", "define"
_PREFIX = {"+": OVERWRITE, "~": DEFAULT, "_": DEFINE}
_ORDER = {"array": 1, "star_regex": 2, "star_double": 3, "star_single": 4, "star_all": 5}
_sort_key = strategies.computed_sort_key(_ORDER)
ROOT = "root"


def _applicable_map(mode, source, key):
    if mode == OVERWRITE:
        return True
    if mode == DEFAULT:
        return source.get(key) is None
    return key not in source


def _applicable_list(mode, source, index, orig_size):
    if index < 0 or orig_size is None or index >= len(source):
        return False
    if mode == OVERWRITE:
        return True
    if mode == DEFAULT:
        return source[index] is None
    return index >= orig_size and source[index] is None


def _set_data(parent, matched, value, mode):
    if isinstance(parent, dict):
        if _applicable_map(mode, parent, matched.raw_key):
            parent[matched.raw_key] = value
    elif isinstance(parent, list) and matched.orig_size is not None:
        index = int(matched.raw_key)
        if _applicable_list(mode, parent, index, matched.orig_size):
            parent[index] = value


class _DataType:
    """
    What an object spec expects at its level: C{list} (array index keys),
    C{map} (name keys) or C{runtime} (only C{*}: whatever is there).
    """

    def __init__(self, kind, max_index=-1):
        self.kind = kind
        self.max_index = max_index

    def compatible(self, value):
        if self.kind == "list":
            return value is None or isinstance(value, list)
        if self.kind == "map":
            return value is None or isinstance(value, dict)
        return value is not None

    def create(self, key, walked, mode):
        if self.kind == "runtime":
            return None
        parent = walked[-1].tree_ref
        value = [] if self.kind == "list" else {}
        if isinstance(parent, dict) and _applicable_map(mode, parent, key):
            parent[key] = value
            return value
        if isinstance(parent, list):
            try:
                index = parse_java_int(key)
            except ValueError:
                return None
            if _applicable_list(mode, parent, index, walked[-1].matched.orig_size):
                parent[index] = value
                return value
        return None

    def expand(self, items):
        orig_size = len(items)
        if self.kind == "list" and self.max_index >= len(items):
            items.extend([None] * (self.max_index + 1 - len(items)))
        return orig_size


def _parse_key(raw, mode, where):
    key = raw
    if key[:1] in _PREFIX:
        mode = _PREFIX[key[0]]
        key = key[1:]
    check_value = False
    if len(raw) > 1 and raw.endswith("?") and not key.endswith("\\?"):
        check_value = True
        key = key[:-1]
    element = parse_key(key, where)
    if not isinstance(element, (Star, Literal, ArrayElement)):
        raise SpecError(f"key {raw!r} is not valid in a modify spec (literal, '*' pattern or [index] keys only)", where)
    return mode, check_value, element


def _build_children(spec, root_mode, scope, where):
    children, seen = [], set()
    for raw, rhs in spec.items():
        if not isinstance(raw, str):
            raise SpecError(f"keys must be strings, got {raw!r}", where)
        for key in split_alternatives(raw):
            child_where = where + (raw,)
            if isinstance(rhs, dict) and rhs:
                child = Composite(key, rhs, root_mode, scope, child_where)
            else:
                child = Leaf(key, rhs, root_mode, scope, child_where)
            canonical = child.element.canonical
            if canonical in seen:
                raise SpecError(f"duplicate key {canonical!r} (after expanding '|' and removing '?')", child_where)
            seen.add(canonical)
            children.append(child)
    return children


class _Node:
    def apply(self, key, value, walked, output, context):
        matched = self.element.match(key, walked)
        if matched is None:
            return False
        if not self.check_value or value is not MISSING:
            self.apply_element(key, value, matched, walked, context)
        return True


class Composite(_Node):
    def __init__(self, key, spec, root_mode, scope, where):
        self.mode, self.check_value, self.element = _parse_key(key, root_mode, where)
        self.element.check(scope, where)
        children = _build_children(spec, root_mode, scope + (level_groups(self.element, scope),), where)
        self.literals, computed = {}, []
        max_index, map_key, array_key = -1, None, None
        for child in children:
            element = child.element
            if isinstance(element, Literal):
                map_key = element
                self.literals[element.raw_key] = child
            elif isinstance(element, ArrayElement):
                if element.mode != "explicit":
                    raise SpecError(f"only explicit array indexes such as [0] are valid here, got {element.raw_key!r}",
                                    where)
                array_key = element
                index = int(element.index)
                if not child.check_value:
                    max_index = max(max_index, index)
                self.literals[str(index)] = child
            else:
                if not isinstance(element, StarAll):
                    map_key = element
                computed.append(child)
            if map_key is not None and array_key is not None:
                raise SpecError(
                    f"can not mix array index and object keys: {map_key.canonical!r} and {array_key.canonical!r}",
                    where,
                )
        if array_key is not None:
            self.data_type = _DataType("list", max_index)
        elif map_key is not None:
            self.data_type = _DataType("map")
        else:
            self.data_type = _DataType("runtime")
        computed.sort(key=_sort_key)
        self.computed = computed
        if not computed:
            self.strategy = strategies.ALL_LITERALS
        elif not self.literals:
            self.strategy = strategies.COMPUTED
        elif self.mode == DEFINE and self.data_type.kind == "list":
            self.strategy = strategies.CONFLICT
        else:
            self.strategy = strategies.ALL_LITERALS_WITH_COMPUTED

    def apply_element(self, key, value, matched, walked, context):
        data = None if value is MISSING else value
        if not self.data_type.compatible(data):
            return
        if data is None:
            created = self.data_type.create(key, walked, self.mode)
            if created is not None:
                data = value = created
        if isinstance(data, list):
            matched = MatchedElement(matched.raw_key, matched.subkeys[1:], orig_size=self.data_type.expand(data))
        walked.append(Step(data, matched))
        strategies.process(self.strategy, self, value, walked, None, context)
        walked.pop()


class _Arg:
    """
    A function argument or leaf value: a literal, a C{@} look-up or a
    C{^} context look-up.
    """

    def __init__(self, kind, value):
        self.kind = kind
        self.value = value

    def evaluate(self, walked, context):
        if self.kind == "literal":
            return copy_json(self.value)
        if self.kind == "self":
            return self.value.object_evaluate(walked)
        return self.value.read(context, walked)


def _literal(text, where):
    if text == "":
        return None
    if text.startswith("'") and text.endswith("'"):
        if len(text) < 2:
            raise SpecError("unbalanced quote in function argument \"'\"", where)
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    number = to_number(text)
    return text if number is MISSING else number


def _arg(text, parse, scope, where):
    if text.startswith("^"):
        path = text[1:]
        reader = OutputPath(ROOT if is_blank(path) else ROOT + "." + path, where, display=text)
        reader.check(scope, where)
        return _Arg("context", reader)
    if text.startswith("@"):
        path = OutputPath(ROOT + "." + text, where, display=text)
        element = path.elements[-1]
        if not isinstance(element, Transpose):
            raise SpecError(f"expected an '@(n,path)' look-up, got {text!r}", where)
        element.check(scope, where)
        return _Arg("self", element)
    return _Arg("literal", _literal(text, where) if parse else text)


def parse_function_args(text):
    """
    C{"fn(a, 'b,c', @(1,x))"} -> C{["fn", "a", "'b,c'", "@(1,x)"]} (Java
    JOLT's C{SpecStringParser.parseFunctionArgs}).
    """
    bracket = text.index("(")
    out = [text[:bracket]]
    body = text[bracket + 1 : -1]
    current, in_brackets, in_quotes = [], False, False
    for c in body:
        if c == "(" and not in_quotes:
            in_brackets = True
        elif c == ")" and not in_quotes:
            in_brackets = False
        elif c == "'":
            in_quotes = not in_quotes
        elif c == "," and not in_brackets and not in_quotes:
            out.append("".join(current).strip("".join(chr(i) for i in range(33))))
            current = []
            continue
        current.append(c)
    out.append("".join(current).strip("".join(chr(i) for i in range(33))))
    return out


class _Evaluator:
    def __init__(self, function, args):
        self.function = function
        self.args = args

    def evaluate(self, value, walked, context):
        function, args = self.function, self.args
        try:
            if function is None:
                return args[0].evaluate(walked, context)
            if len(args) == 1:
                arg = args[0].evaluate(walked, context)
                return function() if arg is MISSING else function(arg)
            if args:
                values = [a.evaluate(walked, context) for a in args]
                return function(*[None if v is MISSING else v for v in values])
            return function() if value is MISSING else function(value)
        except RecursionError:
            raise
        except Exception:
            return MISSING


def _function(name, where):
    function = FUNCTIONS.get(name)
    if function is None:
        known = ", ".join(sorted(FUNCTIONS))
        raise SpecError(f"unknown function {name!r} (known: {known})", where)
    return function


def _evaluator(rhs, scope, where):
    if not rhs.startswith("="):
        return _Evaluator(None, [_arg(rhs, False, scope, where)])
    body = rhs[1:]
    if "(" not in rhs and not rhs.endswith(")"):
        return _Evaluator(_function(body, where), [])
    if "(" not in body or not body.endswith(")"):
        raise SpecError(f"malformed function call {rhs!r}", where)
    parts = parse_function_args(body)
    function = _function(parts[0], where)
    return _Evaluator(function, [_arg(part, True, scope, where) for part in parts[1:]])


class Leaf(_Node):
    def __init__(self, key, rhs, root_mode, scope, where):
        self.mode, self.check_value, self.element = _parse_key(key, root_mode, where)
        self.element.check(scope, where)
        eval_scope = scope + (level_groups(self.element, scope),)
        if isinstance(rhs, str):
            self.evaluators = [_evaluator(rhs, eval_scope, where)]
        elif isinstance(rhs, list) and rhs:
            self.evaluators = [
                _evaluator(item, eval_scope, where + (i,)) if isinstance(item, str) else _Evaluator(
                    None, [_Arg("literal", item)]
                )
                for i, item in enumerate(rhs)
            ]
        else:
            self.evaluators = [_Evaluator(None, [_Arg("literal", rhs)])]

    def apply_element(self, key, value, matched, walked, context):
        parent = walked[-1].tree_ref
        walked.append(Step(None if value is MISSING else value, matched))
        result = MISSING
        for evaluator in self.evaluators:
            result = evaluator.evaluate(value, walked, context)
            if result is not MISSING:
                break
        if result is not MISSING:
            _set_data(parent, matched, copy_json(result), self.mode)
        walked.pop()


class Modify:
    def __init__(self, spec, mode):
        if not isinstance(spec, dict):
            raise SpecError("a modify spec must be an object")
        self.root = Composite(ROOT, spec, mode, (0,), ())

    def apply(self, data, context=None):
        walked = [Step(data, MatchedElement(ROOT))]
        self.root.apply(ROOT, data, walked, None, {ROOT: context})
        return data
