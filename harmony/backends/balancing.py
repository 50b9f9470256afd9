# -*- test-case-name: tests.unit.test_balancing -*-
"""
Load balancing over a backend's targets: the strategies that pick one
target per request, the rules that narrow the candidates by request, and
the request keys that C{hash} balances on.

Pure code, no I/O.  A target given to a strategy is any object with the
attributes C{name} (C{str}), C{index} (C{int}, its place in the
configuration), C{weight} (C{int} >= 1) and C{in_flight} (C{int}, requests
under way).  L{make_strategy} builds one strategy object per backend; its
C{pick(candidates, key=None)} gets the non-empty list of targets that may
take the request (in configuration order) and returns one of them.
"""

import fnmatch
import math
import re
from hashlib import blake2b

STRATEGIES = ("round_robin", "weighted", "least_connections", "failover", "hash")


class RoundRobin:
    """
    Each candidate in turn (a counter over the candidates list).
    """

    __slots__ = ("_next",)

    def __init__(self):
        self._next = 0

    def pick(self, candidates, key=None):
        i = self._next
        self._next = i + 1
        return candidates[i % len(candidates)]


class Weighted:
    """
    Smooth weighted round robin (nginx): over every cycle of C{sum(weights)}
    picks each candidate is picked C{weight} times, interleaved (weights 3
    and 1 give C{a a b a}).  The running weight is kept per target name.
    """

    __slots__ = ("_current",)

    def __init__(self):
        self._current = {}

    def pick(self, candidates, key=None):
        current = self._current
        total = 0
        best = None
        best_weight = 0
        for target in candidates:
            name = target.name
            w = current.get(name, 0) + target.weight
            current[name] = w
            total += target.weight
            if best is None or w > best_weight:
                best = target
                best_weight = w
        current[best.name] = best_weight - total
        return best


class LeastConnections:
    """
    The candidate with the fewest requests in flight per unit of weight;
    ties go to the tied candidates in turn (not always to the first).
    """

    __slots__ = ("_turn",)

    def __init__(self):
        self._turn = 0

    def pick(self, candidates, key=None):
        best = candidates[0]
        ties = 0
        for target in candidates:
            # Compare in_flight / weight without floats.
            lhs = target.in_flight * best.weight
            rhs = best.in_flight * target.weight
            if lhs < rhs:
                best = target
                ties = 1
            elif lhs == rhs:
                ties += 1
        if ties == 1:
            return best
        turn = self._turn
        self._turn = turn + 1
        skip = turn % ties
        for target in candidates:
            if target.in_flight * best.weight == best.in_flight * target.weight:
                if not skip:
                    return target
                skip -= 1
        return best  # not reached


class Failover:
    """
    The candidate first in configuration order (lowest C{index}).
    """

    __slots__ = ()

    def pick(self, candidates, key=None):
        best = candidates[0]
        for target in candidates:
            if target.index < best.index:
                best = target
        return best


class Hash:
    """
    Weighted rendezvous (highest random weight) hashing on the request
    key: every candidate scores C{-weight / ln(u)}, C{u} in (0, 1) from
    BLAKE2b of the target name and the key, and the best score wins.  The
    same key goes to the same target in every process and run; when a
    target leaves the candidates only the keys it held move (and a target
    that joins takes keys only for itself).  A request without a key
    (C{None}) is balanced round robin.
    """

    __slots__ = ("_prefixes", "_round_robin")

    # 52 bits of the digest: u = (h + 0.5) / 2**52 is exact, within (0, 1).
    _SCALE = 1.0 / 2.0**52

    def __init__(self):
        self._prefixes = {}
        self._round_robin = RoundRobin()

    def _prefix(self, name):
        prefix = self._prefixes.get(name)
        if prefix is None:
            prefix = self._prefixes[name] = name.encode("utf-8") + b"\x00"
        return prefix

    def pick(self, candidates, key=None):
        if key is None:
            return self._round_robin.pick(candidates)
        if len(candidates) == 1:
            return candidates[0]
        data = key.encode("utf-8")
        scale = self._SCALE
        best = None
        best_score = 0.0
        for target in candidates:
            digest = blake2b(self._prefix(target.name) + data, digest_size=8).digest()
            u = ((int.from_bytes(digest, "big") >> 12) + 0.5) * scale
            score = -target.weight / math.log(u)
            if best is None or score > best_score:
                best = target
                best_score = score
        return best


_STRATEGY_CLASSES = {
    "round_robin": RoundRobin,
    "weighted": Weighted,
    "least_connections": LeastConnections,
    "failover": Failover,
    "hash": Hash,
}


def make_strategy(name):
    """
    A new strategy object (its own state) for one backend.

    @param name: one of L{STRATEGIES}.
    @return: an object with C{pick(candidates, key=None)}.
    @raise ValueError: for an unknown name.
    """
    try:
        cls = _STRATEGY_CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown load balancing strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return cls()


# Routing rules ----------------------------------------------------------------


def _never(value):
    return None


def _matcher(value):
    """
    A C{str -> match or None} callable for one glob or a list of globs
    (any of them), with C{fnmatch.fnmatchcase} semantics.
    """
    patterns = value if isinstance(value, (list, tuple)) else [value]
    if not patterns:
        return _never
    return re.compile("|".join(fnmatch.translate(str(p)) for p in patterns)).match


def _header_test(spec):
    tests = [(name, _matcher(value)) for name, value in spec.items()]

    def test(envelope):
        headers = envelope.details.headers
        return all(any(m(v) for v in headers.get_all(name)) for name, m in tests)

    return test


def _query_test(spec):
    tests = [(name, _matcher(value)) for name, value in spec.items()]

    def test(envelope):
        query = envelope.details.query
        return all(any(m(v) for v in query.get(name, ())) for name, m in tests)

    return test


def _metadata_test(spec):
    tests = [(key, _matcher(value)) for key, value in spec.items()]

    def test(envelope):
        metadata = envelope.metadata
        for key, m in tests:
            v = metadata.get(key)
            if v is None or not m(str(v)):
                return False
        return True

    return test


def _path_test(spec):
    m = _matcher(spec)
    return lambda envelope: m(envelope.details.path) is not None


def _method_test(spec):
    values = spec if isinstance(spec, (list, tuple)) else [spec]
    m = _matcher([str(v).upper() for v in values])
    return lambda envelope: m(envelope.details.method.upper()) is not None


def _dicom_test(attribute):
    def build(spec):
        m = _matcher(spec)

        def test(envelope):
            dicom = envelope.dicom
            if dicom is None:
                return False
            v = getattr(dicom, attribute)
            return v is not None and m(v) is not None

        return test

    return build


_MATCH_KEYS = {
    "header": _header_test,
    "path": _path_test,
    "query": _query_test,
    "metadata": _metadata_test,
    "method": _method_test,
    "calling_aet": _dicom_test("calling_aet"),
    "called_aet": _dicom_test("called_aet"),
    "operation": _dicom_test("operation"),
}

#: The keys a rule's C{match} table may have.
MATCH_KEYS = tuple(_MATCH_KEYS)


class Rule:
    """
    A compiled routing rule: requests it matches go to C{targets} only.

    @ivar match: the C{match} table as configured.
    @ivar targets: a tuple of target names.
    """

    __slots__ = ("match", "targets", "_tests")

    def __init__(self, match, targets, tests):
        self.match = match
        self.targets = targets
        self._tests = tests

    def matches(self, envelope):
        """
        Whether every condition of the rule holds for C{envelope} (a rule
        with no condition matches every request).
        """
        for test in self._tests:
            if not test(envelope):
                return False
        return True

    def __repr__(self):
        return f"Rule(match={self.match!r}, targets={self.targets!r})"


def compile_rule(match, targets):
    """
    Compile a rule from its configuration.

    C{match} keys (all given must hold): C{header} C{{name: value|[values]}}
    (names case-insensitive; any of the request's values of that header),
    C{path} (the path relative to the endpoint prefix, no leading slash),
    C{query} C{{name: value|[values]}}, C{metadata} C{{key: value|[values]}},
    C{method} (case-insensitive), and C{calling_aet}, C{called_aet},
    C{operation} (from C{envelope.dicom}; a request without one matches
    none of these).  Values are C{fnmatch.fnmatchcase} globs; a list
    matches when any of its globs does.

    @param match: the C{match} table (validated by the configuration).
    @param targets: the target names (a sequence of C{str}).
    @return: a L{Rule}.
    @raise ValueError: for an unknown match key.
    """
    tests = []
    for key, spec in match.items():
        build = _MATCH_KEYS.get(key)
        if build is None:
            raise ValueError(f"unknown rule match key {key!r}; expected one of {', '.join(MATCH_KEYS)}")
        tests.append(build(spec))
    return Rule(match, tuple(targets), tuple(tests))


def rule_targets(rules, envelope):
    """
    The target names of the first rule that matches C{envelope}.

    @param rules: L{Rule}s in configuration order.
    @return: a tuple of target names, or C{None} when no rule matches.
    """
    for rule in rules:
        if rule.matches(envelope):
            return rule.targets
    return None


# Hash keys --------------------------------------------------------------------

_PREFIXED_KEYS = ("header", "query", "metadata")
_PLAIN_KEYS = ("client_ip", "calling_aet")


def check_hash_key(spec):
    """
    Check a C{hash_key} setting.

    @return: C{None} when C{spec} is valid, else an error message.
    """
    if isinstance(spec, str):
        if spec in _PLAIN_KEYS:
            return None
        kind, sep, name = spec.partition(":")
        if sep and kind in _PREFIXED_KEYS and name.strip() == name and name:
            return None
    return f"must be header:<name>, query:<name>, metadata:<key>, client_ip or calling_aet (got {spec!r})"


def request_key(spec, envelope):
    """
    The value a request is hashed on.

    @param spec: a C{hash_key} setting (see L{check_hash_key}):
        C{header:<name>} (its first value), C{query:<name>} (its first
        value), C{metadata:<key>}, C{client_ip} or C{calling_aet}.
    @param envelope: a L{harmony.envelope.RequestEnvelope}.
    @return: a C{str}, or C{None} when the request has no such value.
    @raise ValueError: for an invalid C{spec}.
    """
    if spec == "client_ip":
        client = envelope.details.client
        return str(client[0]) if client else None
    if spec == "calling_aet":
        dicom = envelope.dicom
        return None if dicom is None else dicom.calling_aet
    kind, _, name = spec.partition(":")
    if kind == "header" and name:
        return envelope.details.headers.get(name)
    if kind == "query" and name:
        values = envelope.details.query.get(name)
        return values[0] if values else None
    if kind == "metadata" and name:
        value = envelope.metadata.get(name)
        return None if value is None else str(value)
    raise ValueError(f"hash_key {check_hash_key(spec)}")
