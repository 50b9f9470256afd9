# -*- test-case-name: tests.unit.test_jolt -*-
"""
Keys and paths of JOLT specs, and the walked path they are evaluated on.

While an operation walks its spec and the input in parallel it keeps a
I{walked path}: one L{Step} per level (the input value there and the
L{MatchedElement} the spec key made of the input key).  C{&}, C{$}, C{#}
and C{@} references look up that path, counting levels from the end.

Left-hand keys (L{parse_key}) are, as in Java JOLT: a literal; C{*} or a
pattern with stars (C{rating-*}, C{tag-*-*}); C{&}-keys (C{&1-x});
C{$}/C{$n}/C{$(n,m)}; C{#literal}/C{#(literal)}; C{@}; C{@n},
C{@name}, C{@(n,path)}; array keys C{[n]}.  A backslash escapes the next
character (C{\\@}, C{\\*}, C{\\.}, C{\\$}).  Right-hand paths
(L{OutputPath}) are dotted, with C{&} references, C{@(n,path)} look-ups,
array steps C{[]} (append), C{[n]}, C{[&n]}, C{[#n]}, C{[@(n,path)]}.

Every reference is checked when the spec is compiled against the levels
the walk will have at that point (the level count and, per level, how
many C{*} groups its key captures), so C{&5} two levels below the root or
C{&(0,2)} on a one-star key is a L{SpecError}, not a failure at request
time (Java JOLT throws C{IndexOutOfBoundsException} when such a
reference is reached).
"""

import re

from harmony.transforms.errors import SpecError, TransformError
from harmony.transforms.values import (
    MISSING,
    int_value,
    is_blank,
    java_type,
    parse_java_int,
)


class MatchedElement:
    """
    What a spec key made of an input key: the key, the parts its stars
    captured (C{subkeys[0]} is the whole key), how many children matched
    under it (for C{#n}), and for array elements the original size of the
    array (Modifier).
    """

    __slots__ = ("raw_key", "subkeys", "hash_count", "orig_size")

    def __init__(self, key, subkeys=(), orig_size=None):
        self.raw_key = key
        self.subkeys = (key,) + tuple(subkeys)
        self.hash_count = 0
        self.orig_size = orig_size

    def subkey(self, group):
        if group >= len(self.subkeys):
            # The key comes from the input: keep it out of the message.
            raise TransformError(f"a referenced key has no wildcard group {group}")
        return self.subkeys[group]


class Step:
    """
    One level of the walked path.
    """

    __slots__ = ("tree_ref", "matched")

    def __init__(self, tree_ref, matched):
        self.tree_ref = tree_ref
        self.matched = matched


def from_end(walked, index):
    if index >= len(walked):
        raise TransformError(f"reference goes {index} levels up, above the root")
    return walked[-1 - index]


# -- compile-time scope ----------------------------------------------------------------


def check_level(scope, index, text, where):
    """
    @param scope: the group counts of the levels walked at evaluation time.
    """
    if index >= len(scope):
        raise SpecError(
            f"{text!r} refers {index} level(s) up, but only {len(scope) - 1} level(s) exist above it"
            " (counting the root)",
            where,
        )


def check_group(scope, index, group, text, where):
    check_level(scope, index, text, where)
    groups = scope[-1 - index]
    if group > groups:
        raise SpecError(
            f"{text!r} refers to wildcard group {group}, but the key {index} level(s) up captures"
            f" {groups} group(s)",
            where,
        )


# -- references ------------------------------------------------------------------------


def _parse_ref(text, token, where, with_group=True):
    """
    C{&}, C{&2}, C{&(1)}, C{&(1,2)} (and the same with C{$}); C{#}, C{#2}.

    @return: (path index, key group)
    """
    if not text or text[0] != token:
        raise SpecError(f"invalid reference {text!r}: must start with {token!r}", where)
    path_index, group = 0, 0
    meat = text[1:]
    try:
        if meat:
            if with_group and len(meat) >= 3 and meat.startswith("(") and meat.endswith(")"):
                parts = meat[1:-1].split(",")
                while len(parts) > 1 and parts[-1] == "":
                    parts.pop()
                if len(parts) > 2:
                    raise SpecError(f"invalid reference {text!r}", where)
                path_index = parse_java_int(parts[0])
                if len(parts) == 2:
                    group = parse_java_int(parts[1])
            else:
                path_index = parse_java_int(meat)
    except ValueError:
        raise SpecError(f"unable to parse {token!r} reference {text!r}", where) from None
    if path_index < 0 or group < 0:
        raise SpecError(f"reference {text!r} can not have a negative value", where)
    return path_index, group


# -- path elements ---------------------------------------------------------------------


class Element:
    """
    A spec key (left-hand side) or a step of an output path.

    @ivar raw_key: the key (escapes removed).
    @ivar canonical: the canonical form (sorting, duplicate detection).
    @ivar groups: how many star groups a match captures (C{None}: as the
        parent level, for C{@} keys).
    """

    kind = "?"
    evaluatable = False
    groups = 0

    def match(self, key, walked):
        raise NotImplementedError

    def check(self, scope, where):
        """
        Check the references of this element against C{scope}.
        """


class Literal(Element):
    kind = "literal"
    evaluatable = True

    def __init__(self, key):
        self.raw_key = key
        self.canonical = key.replace(".", "\\.")

    def match(self, key, walked):
        return MatchedElement(key) if key == self.raw_key else None

    def evaluate(self, walked):
        return self.raw_key


class At(Element):
    """
    C{@}: the parent's input (its match is the parent's, so C{&0} and
    C{&1} both name the parent key).
    """

    kind = "at"
    groups = None
    canonical = raw_key = "@"

    def match(self, key, walked):
        return walked[-1].matched


class Star(Element):
    """
    Base of the star patterns.
    """

    def string_match(self, text):
        raise NotImplementedError


class StarAll(Star):
    kind = "star_all"
    canonical = raw_key = "*"

    def string_match(self, text):
        return True

    def match(self, key, walked):
        return MatchedElement(key, orig_size=walked[-1].matched.orig_size)


class StarSingle(Star):
    """
    One star with a prefix and/or suffix (C{rating-*}); the star matches
    at least one character.
    """

    kind = "star_single"
    groups = 1

    def __init__(self, key):
        self.raw_key = self.canonical = key
        self.prefix, self.suffix = key.split("*")

    def string_match(self, text):
        return (
            text.startswith(self.prefix)
            and text.endswith(self.suffix)
            and len(text) > len(self.prefix) + len(self.suffix)
        )

    def match(self, key, walked):
        if not self.string_match(key):
            return None
        return MatchedElement(key, (key[len(self.prefix) : len(key) - len(self.suffix)],))


class StarDouble(Star):
    """
    Two stars (C{tag-*-*}); each matches at least one character, the
    first as few as possible.
    """

    kind = "star_double"
    groups = 2

    def __init__(self, key):
        self.raw_key = self.canonical = key
        self.prefix, self.mid, self.suffix = key.split("*")

    def _mid_index(self, text):
        start = len(self.prefix) + 1
        end = len(text) - len(self.suffix) - 1
        if start >= end:
            return -1
        index = text[start:end].find(self.mid)
        return index + start if index >= 0 else -1

    def string_match(self, text):
        return text.startswith(self.prefix) and text.endswith(self.suffix) and self._mid_index(text) > 0

    def match(self, key, walked):
        if not self.string_match(key):
            return None
        mid = self._mid_index(key)
        return MatchedElement(
            key, (key[len(self.prefix) : mid], key[mid + len(self.mid) : len(key) - len(self.suffix)])
        )


class StarRegex(Star):
    """
    Three or more stars: each a non-greedy C{(.+?)}.
    """

    kind = "star_regex"

    def __init__(self, key):
        self.raw_key = self.canonical = key
        self.groups = key.count("*")
        self.pattern = re.compile("".join("(.+?)" if c == "*" else re.escape(c) for c in key) + r"\Z", re.S)

    def string_match(self, text):
        return self.pattern.match(text) is not None

    def match(self, key, walked):
        m = self.pattern.match(key)
        return MatchedElement(key, m.groups()) if m else None


def _end_of_reference(text):
    for i, c in enumerate(text):
        if c not in "0123456789(),":
            return i
    return len(text)


class Amp(Element):
    """
    A key or path step with C{&} references (C{&}, C{&1}, C{&(1,2)}) and
    literal text (C{photo-&-url}).
    """

    kind = "amp"
    evaluatable = True

    def __init__(self, key, where):
        self.raw_key = key
        tokens, literal, canonical = [], "", ""
        i = 0
        while i < len(key):
            c = key[i]
            if c == "&":
                if literal:
                    tokens.append(literal)
                    canonical += literal
                    literal = ""
                end = _end_of_reference(key[i + 1 :])
                text = key[i : i + end + 1]
                ref = _parse_ref(text, "&", where)
                tokens.append((ref, text))
                canonical += f"&({ref[0]},{ref[1]})"
                i += end
            else:
                literal += c
            i += 1
        if literal:
            tokens.append(literal)
            canonical += literal
        self.tokens = tuple(tokens)
        self.canonical = canonical

    def check(self, scope, where):
        for token in self.tokens:
            if not isinstance(token, str):
                (index, group), text = token
                check_group(scope, index, group, text, where)

    def evaluate(self, walked):
        out = []
        for token in self.tokens:
            if isinstance(token, str):
                out.append(token)
            else:
                (index, group), _ = token
                out.append(from_end(walked, index).matched.subkey(group))
        return "".join(out)

    def match(self, key, walked):
        return MatchedElement(key) if self.evaluate(walked) == key else None


class Dollar(Element):
    """
    C{$}, C{$n}, C{$(n,m)}: the key (or star group) matched C{n} levels up,
    as data.
    """

    kind = "dollar"
    evaluatable = True

    def __init__(self, key, where):
        self.raw_key = key
        self.ref = _parse_ref(key, "$", where)
        self.canonical = f"$({self.ref[0]},{self.ref[1]})"

    def check(self, scope, where):
        check_group(scope, self.ref[0], self.ref[1], self.raw_key, where)

    def evaluate(self, walked):
        index, group = self.ref
        return from_end(walked, index).matched.subkey(group)

    def match(self, key, walked):
        return MatchedElement(self.evaluate(walked))


class Hash(Element):
    """
    C{#literal} / C{#(literal)}: the literal, as data.
    """

    kind = "hash"

    def __init__(self, key, where):
        self.raw_key = key
        if is_blank(key):
            raise SpecError("'#' key can not be empty", where)
        if not key.startswith("#"):
            raise SpecError(f"'#' key must start with '#': {key!r}", where)
        if len(key) <= 1:
            raise SpecError(f"'#' key needs a value after the '#': {key!r}", where)
        if key[1] == "(":
            if not key.endswith(")"):
                raise SpecError(f"'#' key with mismatched parentheses: {key!r}", where)
            self.value = key[2:-1]
        else:
            self.value = key[1:]
        self.canonical = f"#({self.value})"

    def match(self, key, walked):
        return MatchedElement(self.value)


class Transpose(Element):
    """
    C{@n}, C{@name}, C{@(n,path)}: the data C{n} levels up, then down
    C{path} (which may hold C{&} references and C{[n]} steps).
    """

    kind = "transpose"
    evaluatable = True
    groups = None

    def __init__(self, key, where):
        self.raw_key = key
        if len(key) < 2:
            raise SpecError(f"'@' look-up {key!r} is too short", where)
        if key[0] != "@":
            raise SpecError(f"'@' look-up must start with '@': {key!r}", where)
        meat = key[1:]
        if "@" in meat:
            raise SpecError(f"'@' look-up can not contain a nested '@': {key!r}", where)
        if "*" in meat or "[]" in meat:
            raise SpecError(f"'@' look-up can not contain '*' or '[]': {key!r}", where)
        if meat.startswith("("):
            if not meat.endswith(")"):
                raise SpecError(f"'@(' look-up needs a matching ')': {key!r}", where)
            meat = meat[1:-1]
        sub_path = meat
        self.up_level = 0
        if meat[:1].isdigit():
            digits, sep, rest = meat.partition(",")
            if not digits.isdigit() or not digits.isascii():
                raise SpecError(f"'@' look-up with a non-numeric level: {key!r}", where)
            self.up_level = int(digits)
            sub_path = rest if sep else ""
        self.reader = None if not sub_path else OutputPath(sub_path, where)
        self.canonical = f"@({self.up_level},{self.reader.canonical if self.reader else ''})"

    def check(self, scope, where):
        check_level(scope, self.up_level, self.raw_key, where)
        if self.reader is not None:
            self.reader.check(scope, where)

    def object_evaluate(self, walked):
        """
        The data found, or L{MISSING}.
        """
        tree = from_end(walked, self.up_level).tree_ref
        if self.reader is None:
            return tree
        return self.reader.read(tree, walked)

    def evaluate(self, walked):
        """
        The data found as a key: numbers truncated to integers, booleans
        as C{true}/C{false}, strings as is; anything else C{None}.
        """
        data = self.object_evaluate(walked)
        kind = java_type(data)
        if kind in ("Integer", "Long", "Double", "BigInteger"):
            return str(int_value(data))
        if kind == "Boolean":
            return "true" if data else "false"
        if kind == "String":
            return data
        return None

    def match(self, key, walked):
        return walked[-1].matched


def _non_negative_int(text):
    if text.isdigit() and text.isascii() and len(text) < 10:
        return text
    try:
        return text if parse_java_int(text) >= 0 else None
    except ValueError:
        return None


class ArrayElement(Element):
    """
    C{[]}, C{[3]}, C{[&1]}, C{[&(1,2)]}, C{[#2]}, C{[@(1,index)]}.
    """

    kind = "array"
    evaluatable = True

    def __init__(self, key, where):
        self.raw_key = key
        if not (key.startswith("[") and key.endswith("]")):
            raise SpecError(f"invalid array key {key!r}", where)
        self.ref = self.transpose = self.index = None
        if len(key) == 2:
            self.mode = "append"
            self.canonical = "[]"
            return
        meat = key[1:-1]
        first = meat[0]
        if first == "&":
            self.mode = "reference"
            self.ref = _parse_ref(meat, "&", where)
            self.canonical = f"[&({self.ref[0]},{self.ref[1]})]"
        elif first == "#":
            self.mode = "hash"
            self.ref = _parse_ref(meat, "#", where, with_group=False)
            self.canonical = f"[#{self.ref[0]}]"
        elif first == "@":
            self.mode = "transpose"
            self.transpose = Transpose(meat, where)
            self.canonical = f"[{self.transpose.canonical}]"
        else:
            self.index = _non_negative_int(meat)
            if self.index is None:
                raise SpecError(f"bad explicit array index {meat!r} in {key!r}", where)
            self.mode = "explicit"
            self.canonical = f"[{self.index}]"

    def check(self, scope, where):
        if self.mode == "reference":
            check_group(scope, self.ref[0], self.ref[1], self.raw_key, where)
        elif self.mode == "hash":
            check_level(scope, self.ref[0], self.raw_key, where)
        elif self.mode == "transpose":
            self.transpose.check(scope, where)

    def evaluate(self, walked):
        mode = self.mode
        if mode == "append":
            return "[]"
        if mode == "explicit":
            return self.index
        if mode == "hash":
            return str(from_end(walked, self.ref[0]).matched.hash_count)
        if mode == "transpose":
            key = self.transpose.evaluate(walked)
            return None if key is None else _non_negative_int(key)
        index, group = self.ref
        return _non_negative_int(from_end(walked, index).matched.subkey(group))

    def match(self, key, walked):
        orig_size = walked[-1].matched.orig_size
        if orig_size is not None and self.evaluate(walked) == key:
            return MatchedElement(key, orig_size=orig_size)
        return None


def _count(text, char):
    return text.count(char)


def remove_escaped(key):
    """
    C{key} without escaped characters (C{"\\@pants"} -> C{"pants"}): what
    decides the kind of key.
    """
    out, escape = [], False
    for c in key:
        if c == "\\":
            escape = not escape
        else:
            if not escape:
                out.append(c)
            escape = False
    return "".join(out)


def remove_escape_chars(key):
    """
    C{key} with escapes resolved (C{"\\@pants"} -> C{"@pants"}).
    """
    out, escape = [], False
    for c in key:
        if c == "\\":
            if escape:
                out.append(c)
            escape = not escape
        else:
            out.append(c)
            escape = False
    return "".join(out)


def parse_key(key, where):
    """
    One spec key (or output path step) as an L{Element}, the way Java
    JOLT's C{PathElementBuilder.parseSingleKeyLHS} reads it.
    """
    if "\\" in key:
        inspect, element = remove_escaped(key), remove_escape_chars(key)
    else:
        inspect = element = key
    if inspect == "@":
        return At()
    if inspect == "*":
        return StarAll()
    if inspect.startswith("["):
        if _count(inspect, "[") != 1 or _count(inspect, "]") != 1:
            raise SpecError(f"invalid key {key!r}: too many [] references", where)
        return ArrayElement(element, where)
    if inspect.startswith("@") or "@(" in inspect:
        return Transpose(key, where)
    if "@" in inspect:
        raise SpecError(f"invalid key {key!r}: '@' is only valid at the front", where)
    if "$" in inspect:
        return Dollar(element, where)
    if "[" in inspect:
        if _count(inspect, "[") != 1 or _count(inspect, "]") != 1:
            raise SpecError(f"invalid key {key!r}: too many [] references", where)
        return ArrayElement(element, where)
    if "&" in inspect:
        if "*" in inspect:
            raise SpecError(f"invalid key {key!r}: can not mix '*' with '&'", where)
        return Amp(element, where)
    if "*" in inspect:
        stars = _count(inspect, "*")
        if stars == 1:
            return StarSingle(element)
        if stars == 2:
            return StarDouble(element)
        return StarRegex(element)
    if "#" in inspect:
        return Hash(element, where)
    return Literal(element)


def level_groups(element, scope):
    """
    How many star groups the level C{element} adds to the walk captures.
    """
    return scope[-1] if element.groups is None else element.groups


def split_alternatives(key):
    """
    C{"a|b"} -> C{["a", "b"]} (Java's C{split}: trailing empty parts
    dropped, escapes not honoured).
    """
    parts = key.split("|")
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return parts


# -- dotted paths ----------------------------------------------------------------------


def _fix_leading_bracket_sugar(text):
    """
    C{"data[2].x"} -> C{"data.[2].x"}.
    """
    if not text:
        return ""
    out, prev = [text[0]], text[0]
    for c in text[1:]:
        if c == "[" and prev != "\\" and prev not in "@.":
            out.append(".")
        out.append(c)
        prev = c
    return "".join(out)


def _parse_at(text, i, ref):
    """
    The rest of an C{@} step after the C{@}: C{"(1,a.b)"} whole, or
    C{"abc"} up to the next dot (returned as C{"(abc)"}).
    """
    if i >= len(text):
        return "", i
    c = text[i]
    i += 1
    parens = c == "("
    depth = 1 if parens else 0
    if c == ".":
        raise SpecError(f"unable to parse path {ref!r}: invalid '@' step")
    out = [c]
    while i < len(text):
        c = text[i]
        i += 1
        out.append(c)
        if parens:
            if c == "(":
                raise SpecError(f"unable to parse path {ref!r}: too many '('")
            if c == ")":
                depth -= 1
            if depth == 0:
                return "".join(out), i
        elif c == ".":
            return "(" + "".join(out[:-1]) + ")", i
    if parens and depth != 0:
        raise SpecError(f"unable to parse path {ref!r}: unbalanced '@(...)'")
    return "".join(out), i


def split_dotted(text):
    """
    A dotted path as its steps (C{\\.} is a dot inside a step; C{@(...)}
    may contain dots).
    """
    text = _fix_leading_bracket_sugar(text)
    out, i, n = [], 0, len(text)
    while i < n:
        sb, prev_escape = [], False
        while i < n:
            c = text[i]
            i += 1
            escape = c == "\\" and not prev_escape
            if prev_escape and c not in ".\\":
                sb += ["\\", c]
            elif c == "@":
                sb.append("@")
                at, i = _parse_at(text, i, text)
                sb.append(at)
                joined = "".join(sb)
                if not ("[" in joined and "]" not in joined):
                    out.append(joined)
                    sb = []
            elif c == ".":
                if prev_escape:
                    sb.append(".")
                else:
                    if sb:
                        out.append("".join(sb))
                    break
            elif not escape:
                sb.append(c)
            prev_escape = escape
        else:
            if sb:
                out.append("".join(sb))
    return out


KEY, INDEX, APPEND = "key", "index", "append"

#: Writing at an array index pads the array with nulls up to it: an index
#: taken from the input (C{[&1]}) must not make a huge array.
MAX_ARRAY_INDEX = 100000


class OutputPath:
    """
    A dotted path: where Shiftr writes (L{write}) or where a look-up reads
    (L{read}).

    @ivar canonical: the canonical form.
    """

    def __init__(self, text, where, display=None):
        if not isinstance(text, str):
            raise SpecError(f"an output path must be a string, got {_describe(text)}", where)
        shown = text if display is None else display
        if ("*" in text and "\\*" not in text) or ("$" in text and "\\$" not in text):
            raise SpecError(f"path {shown!r} can not contain '*' or '$'", where)
        self.text = shown
        try:
            steps = split_dotted(text)
        except SpecError as e:
            raise SpecError(e.message.replace(repr(text), repr(shown)), where) from None
        elements = []
        for step in steps:
            element = parse_key(step, where)
            if isinstance(element, At):
                raise SpecError(f"'@' alone is not valid in a path: {shown!r}", where)
            if not element.evaluatable:
                raise SpecError(f"{step!r} is not valid in a path ({shown!r})", where)
            elements.append(element)
        self.elements = tuple(elements)
        kinds = []
        for element in elements:
            canonical = element.canonical
            if canonical == "[]":
                kinds.append(APPEND)
            elif canonical.startswith("[") and canonical.endswith("]"):
                kinds.append(INDEX)
            else:
                kinds.append(KEY)
        self.kinds = tuple(kinds)
        self.canonical = ".".join(e.canonical for e in elements)
        constant = [_constant_key(e) for e in elements]
        #: The keys when no step depends on the walk (the common case).
        self._constant = None if None in constant else constant
        self._steps = tuple(zip(self.kinds, (i == len(elements) - 1 for i in range(len(elements))), self.kinds[1:] + (None,)))

    def check(self, scope, where):
        for element in self.elements:
            element.check(scope, where)

    def evaluate(self, walked):
        if self._constant is not None:
            return self._constant
        keys = []
        for element in self.elements:
            key = element.evaluate(walked)
            if key is None:
                return None
            keys.append(key)
        return keys

    def read(self, tree, walked):
        """
        The value at this path under C{tree}, or L{MISSING}.
        """
        keys = self.evaluate(walked)
        if keys is None:
            return MISSING
        last = len(keys) - 1
        for depth, (kind, key) in enumerate(zip(self.kinds, keys)):
            if tree is None:
                return MISSING
            sub = _get(tree, kind, key)
            if sub is _WRONG_TYPE:
                return MISSING
            if depth == last:
                return sub
            tree = None if sub is MISSING else sub
        return MISSING

    def write(self, output, data, walked):
        """
        Shiftr's write: create containers on the way; a value already at
        the end turns into an array holding both.  Nothing is written when
        a step does not evaluate (a look-up found no usable key) or the
        output has a container of the other kind on the way.
        """
        keys = self.evaluate(walked)
        if keys is None:
            return
        tree = output
        for (kind, last, next_kind), key in zip(self._steps, keys):
            if kind is KEY:
                if tree.__class__ is not dict:
                    return
                current = tree.get(key, MISSING)
            else:
                if tree.__class__ is not list:
                    return
                if kind is APPEND:
                    current = MISSING
                else:
                    index = int(key)
                    current = tree[index] if index < len(tree) else MISSING
            if last:
                if current is MISSING or current is None:
                    _set(tree, kind, key, data)
                elif current.__class__ is list:
                    current.append(data)
                else:
                    _set(tree, kind, key, [current, data])
                return
            if current is MISSING or current is None:
                current = {} if next_kind is KEY else []
                _set(tree, kind, key, current)
            tree = current


def _constant_key(element):
    if isinstance(element, Literal):
        return element.raw_key
    if isinstance(element, ArrayElement) and element.mode in ("append", "explicit"):
        return element.evaluate(None)
    return None


_WRONG_TYPE = object()


def _get(tree, kind, key):
    if kind == KEY:
        if not isinstance(tree, dict):
            return _WRONG_TYPE
        return tree.get(key, MISSING)
    if not isinstance(tree, list):
        return _WRONG_TYPE
    if kind == APPEND:
        return MISSING
    index = int(key)
    return tree[index] if index < len(tree) else MISSING


def _set(tree, kind, key, value):
    if kind == KEY:
        tree[key] = value
    elif kind == APPEND:
        tree.append(value)
    else:
        index = int(key)
        if index >= MAX_ARRAY_INDEX:
            raise TransformError(f"an output array index is too large (the limit is {MAX_ARRAY_INDEX - 1})")
        if index >= len(tree):
            tree.extend([None] * (index + 1 - len(tree)))
        tree[index] = value


def _describe(value):
    kind = java_type(value)
    return "null" if kind is None else {"Map": "an object", "List": "an array"}.get(kind, f"{value!r}")
