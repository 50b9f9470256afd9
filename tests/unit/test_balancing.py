"""
Tests for L{harmony.backends.balancing}: the distribution of every
strategy, routing rules (each match key, globs, lists, AND, first rule
wins), hash keys, hash stability and minimal movement.
"""

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from harmony.backends.balancing import (
    MATCH_KEYS,
    STRATEGIES,
    Rule,
    check_hash_key,
    compile_rule,
    make_strategy,
    request_key,
    rule_targets,
)
from harmony.envelope import DicomRequest, RequestDetails, RequestEnvelope


class Target:
    def __init__(self, name, index, weight=1, in_flight=0):
        self.name = name
        self.index = index
        self.weight = weight
        self.in_flight = in_flight

    def __repr__(self):
        return f"Target({self.name!r})"


def targets(*weights):
    return [Target("abcdefgh"[i], i, weight=w) for i, w in enumerate(weights)]


def picks(strategy, candidates, n, key=None):
    return "".join(strategy.pick(candidates, key).name for _ in range(n))


def envelope(method="GET", path="", headers=(), query=None, metadata=None, dicom=None, client=None):
    details = RequestDetails(method=method, path=path, headers=list(headers), query=query or {}, client=client)
    return RequestEnvelope(details=details, metadata=metadata or {}, dicom=dicom)


class MakeStrategyTests(SynchronousTestCase):
    def test_every_strategy(self):
        self.assertEqual(STRATEGIES, ("round_robin", "weighted", "least_connections", "failover", "hash"))
        for name in STRATEGIES:
            first, second = make_strategy(name), make_strategy(name)
            self.assertIsNot(first, second)
            self.assertTrue(callable(first.pick))

    def test_unknown(self):
        for name in ("random", "", None, "Round_Robin"):
            with self.assertRaises(ValueError) as e:
                make_strategy(name)
            self.assertIn("round_robin, weighted, least_connections, failover, hash", str(e.exception))


class RoundRobinTests(SynchronousTestCase):
    def test_rotates(self):
        a, b, c = targets(1, 5, 1)  # weights are ignored
        self.assertEqual(picks(make_strategy("round_robin"), [a, b, c], 7), "abcabca")

    def test_candidates_change(self):
        a, b, c = targets(1, 1, 1)
        rr = make_strategy("round_robin")
        self.assertEqual(picks(rr, [a, b, c], 2), "ab")
        self.assertEqual(picks(rr, [a, c], 3), "aca")
        self.assertEqual(picks(rr, [b], 2), "bb")

    def test_state_per_instance(self):
        a, b = targets(1, 1)
        first, second = make_strategy("round_robin"), make_strategy("round_robin")
        self.assertEqual(picks(first, [a, b], 1), "a")
        self.assertEqual(picks(second, [a, b], 1), "a")
        self.assertEqual(picks(first, [a, b], 1), "b")


class WeightedTests(SynchronousTestCase):
    def test_three_to_one_interleaved(self):
        self.assertEqual(picks(make_strategy("weighted"), targets(3, 1), 8), "aabaaaba")

    def test_nginx_sequence(self):
        # The example of nginx's smooth weighted round robin: {a a b a c a a}.
        self.assertEqual(picks(make_strategy("weighted"), targets(5, 1, 1), 14), "aabacaaaabacaa")

    def test_exact_in_every_cycle(self):
        w = make_strategy("weighted")
        candidates = targets(2, 3, 5)
        for _ in range(10):
            self.assertEqual(Counter(picks(w, candidates, 10)), {"a": 2, "b": 3, "c": 5})

    def test_equal_weights_rotate(self):
        self.assertEqual(picks(make_strategy("weighted"), targets(2, 2, 2), 6), "abcabc")

    def test_candidate_leaves(self):
        a, b, c = targets(1, 1, 2)
        w = make_strategy("weighted")
        self.assertEqual(Counter(picks(w, [a, b, c], 4)), {"a": 1, "b": 1, "c": 2})
        self.assertEqual(Counter(picks(w, [a, c], 6)), {"a": 2, "c": 4})


class LeastConnectionsTests(SynchronousTestCase):
    def test_fewest_in_flight(self):
        a, b, c = targets(1, 1, 1)
        a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
        self.assertEqual(picks(make_strategy("least_connections"), [a, b, c], 3), "bbb")

    def test_per_unit_of_weight(self):
        a, b = targets(4, 1)
        a.in_flight, b.in_flight = 3, 1  # 0.75 < 1
        lc = make_strategy("least_connections")
        self.assertEqual(picks(lc, [a, b], 1), "a")
        a.in_flight = 5  # 1.25 > 1
        self.assertEqual(picks(lc, [a, b], 1), "b")

    def test_all_tied_rotate(self):
        self.assertEqual(picks(make_strategy("least_connections"), targets(1, 1, 1), 7), "abcabca")

    def test_ties_rotate_among_the_tied(self):
        a, b, c, d = targets(1, 1, 2, 1)
        a.in_flight, b.in_flight, c.in_flight, d.in_flight = 1, 1, 2, 3  # a, b, c tie at 1
        self.assertEqual(picks(make_strategy("least_connections"), [a, b, c, d], 6), "abcabc")
        b.in_flight = 0
        self.assertEqual(picks(make_strategy("least_connections"), [a, b, c, d], 3), "bbb")

    def test_follows_in_flight(self):
        lc = make_strategy("least_connections")
        candidates = targets(1, 1)
        order = ""
        for _ in range(6):
            chosen = lc.pick(candidates)
            chosen.in_flight += 1
            order += chosen.name
        # Ties (0-0, 1-1, 2-2) go in turn: a, then b, then a.
        self.assertEqual(order, "abbaab")
        self.assertEqual([t.in_flight for t in candidates], [3, 3])


class FailoverTests(SynchronousTestCase):
    def test_lowest_index(self):
        a, b, c = targets(1, 1, 1)
        fo = make_strategy("failover")
        self.assertEqual(picks(fo, [a, b, c], 3), "aaa")
        self.assertEqual(picks(fo, [b, c], 3), "bbb")
        self.assertEqual(picks(fo, [c, b], 1), "b")
        self.assertEqual(picks(fo, [c], 1), "c")


class HashTests(SynchronousTestCase):
    KEYS = [f"patient-{i}" for i in range(3000)]

    def assignment(self, candidates, keys=KEYS):
        h = make_strategy("hash")
        return {key: h.pick(candidates, key).name for key in keys}

    def test_stable(self):
        """
        The same key goes to the same target, in every instance and run
        (BLAKE2b, not Python's salted hash): these values are pinned.
        """
        pinned = {
            "patient-1": "c",
            "patient-2": "a",
            "patient-3": "b",
            "patient-4": "c",
            "patient-5": "a",
            "patient-6": "c",
        }
        self.assertEqual(self.assignment(targets(1, 1, 1), list(pinned)), pinned)
        h = make_strategy("hash")
        candidates = targets(1, 1, 1)
        for key, name in pinned.items():
            self.assertEqual(picks(h, candidates, 3, key=key), name * 3)

    def test_order_of_candidates_does_not_matter(self):
        a, b, c = targets(1, 1, 1)
        self.assertEqual(self.assignment([a, b, c]), self.assignment([c, a, b]))

    def test_even_spread(self):
        counts = Counter(self.assignment(targets(1, 1, 1)).values())
        self.assertEqual(sum(counts.values()), 3000)
        for name in "abc":
            self.assertTrue(900 <= counts[name] <= 1100, counts)

    def test_weighted_spread(self):
        counts = Counter(self.assignment(targets(3, 1)).values())
        self.assertTrue(2150 <= counts["a"] <= 2350, counts)
        self.assertEqual(counts["a"] + counts["b"], 3000)

    def test_leaving_moves_only_its_keys(self):
        a, b, c = targets(1, 1, 1)
        before = self.assignment([a, b, c])
        after = self.assignment([a, c])
        moved = {k for k in self.KEYS if before[k] != after[k]}
        self.assertEqual(moved, {k for k in self.KEYS if before[k] == "b"})
        self.assertEqual({after[k] for k in moved}, {"a", "c"})
        self.assertTrue(300 <= sum(after[k] == "a" for k in moved) <= 700)

    def test_joining_takes_keys_for_itself_only(self):
        a, b, c, d = targets(1, 1, 1, 1)
        before = self.assignment([a, b, c])
        after = self.assignment([a, b, c, d])
        moved = [k for k in self.KEYS if before[k] != after[k]]
        self.assertEqual({after[k] for k in moved}, {"d"})
        self.assertTrue(650 <= len(moved) <= 850, len(moved))

    def test_weight_change_moves_keys_towards_it_only(self):
        a, b = targets(1, 1)
        before = self.assignment([a, b])
        a.weight = 2
        after = self.assignment([a, b])
        moved = [k for k in self.KEYS if before[k] != after[k]]
        self.assertTrue(moved)
        self.assertEqual({(before[k], after[k]) for k in moved}, {("b", "a")})

    def test_single_candidate(self):
        (a,) = targets(1)
        self.assertEqual(picks(make_strategy("hash"), [a], 2, key="x"), "aa")

    def test_no_key_round_robin(self):
        h = make_strategy("hash")
        candidates = targets(1, 1, 1)
        self.assertEqual(picks(h, candidates, 4), "abca")
        self.assertEqual(picks(h, candidates, 2, key="patient-1"), "cc")
        self.assertEqual(picks(h, candidates, 2), "bc")

    def test_non_ascii_key(self):
        h = make_strategy("hash")
        candidates = targets(1, 1, 1)
        name = h.pick(candidates, "Müller^Jörg").name
        self.assertEqual(picks(h, candidates, 3, key="Müller^Jörg"), name * 3)


class RuleTests(SynchronousTestCase):
    def check(self, match, matching, not_matching):
        rule = compile_rule(match, ["t"])
        for env in matching:
            self.assertTrue(rule.matches(env), (match, env))
        for env in not_matching:
            self.assertFalse(rule.matches(env), (match, env))

    def test_rule_attributes(self):
        match = {"method": "GET"}
        rule = compile_rule(match, ["api1", "api2"])
        self.assertIsInstance(rule, Rule)
        self.assertIs(rule.match, match)
        self.assertEqual(rule.targets, ("api1", "api2"))
        self.assertIn("api1", repr(rule))

    def test_header(self):
        self.check(
            {"header": {"X-Tenant": "a"}},
            [
                envelope(headers=[("X-Tenant", "a")]),
                envelope(headers=[("x-tenant", "a")]),
                envelope(headers=[("X-TENANT", "b"), ("x-tenant", "a")]),
            ],
            [
                envelope(),
                envelope(headers=[("X-Tenant", "A")]),
                envelope(headers=[("X-Tenant", "ab")]),
                envelope(headers=[("X-Other", "a")]),
            ],
        )

    def test_header_name_any_case_in_config(self):
        self.check({"header": {"x-TENANT": "a"}}, [envelope(headers=[("X-Tenant", "a")])], [envelope()])

    def test_header_globs_and_lists(self):
        self.check(
            {"header": {"X-Tenant": ["north-*", "south"]}},
            [envelope(headers=[("X-Tenant", "north-1")]), envelope(headers=[("X-Tenant", "south")])],
            [envelope(headers=[("X-Tenant", "south-1")]), envelope(headers=[("X-Tenant", "west")])],
        )

    def test_several_headers_all_must_hold(self):
        self.check(
            {"header": {"X-A": "1", "X-B": "2"}},
            [envelope(headers=[("X-A", "1"), ("X-B", "2")])],
            [envelope(headers=[("X-A", "1")]), envelope(headers=[("X-A", "1"), ("X-B", "3")])],
        )

    def test_path(self):
        self.check(
            {"path": "Patient/*"},
            [envelope(path="Patient/123"), envelope(path="Patient/1/_history/2")],
            [envelope(path="Observation/1"), envelope(path="patient/1"), envelope(path="Patient")],
        )

    def test_path_list_and_character_classes(self):
        self.check(
            {"path": ["studies/[0-9]*", "metadata"]},
            [envelope(path="studies/1.2.3"), envelope(path="metadata")],
            [envelope(path="studies/x"), envelope(path="metadata/1"), envelope(path="")],
        )

    def test_query(self):
        self.check(
            {"query": {"tenant": ["a", "b?"]}},
            [
                envelope(query={"tenant": ["a"]}),
                envelope(query={"tenant": ["x", "b1"]}),
            ],
            [
                envelope(),
                envelope(query={"tenant": []}),
                envelope(query={"tenant": ["b"]}),
                envelope(query={"t": ["a"]}),
            ],
        )

    def test_metadata(self):
        self.check(
            {"metadata": {"jwt.sub": "svc-*", "tier": "gold"}},
            [envelope(metadata={"jwt.sub": "svc-1", "tier": "gold"})],
            [
                envelope(metadata={"jwt.sub": "svc-1"}),
                envelope(metadata={"jwt.sub": "user", "tier": "gold"}),
                envelope(),
            ],
        )

    def test_method(self):
        self.check(
            {"method": ["get", "HEAD"]},
            [envelope(method="GET"), envelope(method="head"), envelope(method="Get")],
            [envelope(method="POST"), envelope(method="DIMSE")],
        )
        self.check({"method": "P*"}, [envelope(method="PUT"), envelope(method="patch")], [envelope(method="GET")])

    def test_calling_aet(self):
        self.check(
            {"calling_aet": ["CT1", "MR*"]},
            [
                envelope(method="DIMSE", dicom=DicomRequest("find", calling_aet="CT1")),
                envelope(method="DIMSE", dicom=DicomRequest("find", calling_aet="MR7")),
            ],
            [
                envelope(method="DIMSE", dicom=DicomRequest("find", calling_aet="CT2")),
                envelope(method="DIMSE", dicom=DicomRequest("find", calling_aet="ct1")),
                envelope(method="DIMSE", dicom=DicomRequest("find")),
                envelope(headers=[("calling_aet", "CT1")]),
            ],
        )

    def test_called_aet(self):
        self.check(
            {"called_aet": "HARMONY*"},
            [envelope(method="DIMSE", dicom=DicomRequest("store", called_aet="HARMONY_A"))],
            [envelope(method="DIMSE", dicom=DicomRequest("store", called_aet="OTHER")), envelope()],
        )

    def test_operation(self):
        self.check(
            {"operation": ["get", "move"]},
            [envelope(dicom=DicomRequest("get")), envelope(dicom=DicomRequest("move"))],
            [envelope(dicom=DicomRequest("find")), envelope(method="GET")],
        )

    def test_keys_combine_with_and(self):
        self.check(
            {"method": "GET", "path": "Patient/*", "header": {"X-Tenant": "a"}},
            [envelope(method="GET", path="Patient/1", headers=[("X-Tenant", "a")])],
            [
                envelope(method="POST", path="Patient/1", headers=[("X-Tenant", "a")]),
                envelope(method="GET", path="Encounter/1", headers=[("X-Tenant", "a")]),
                envelope(method="GET", path="Patient/1"),
            ],
        )

    def test_empty_match_matches_everything(self):
        self.check({}, [envelope(), envelope(dicom=DicomRequest("echo"))], [])

    def test_empty_list_matches_nothing(self):
        self.check({"path": []}, [], [envelope(), envelope(path="x")])

    def test_unknown_key(self):
        with self.assertRaises(ValueError) as e:
            compile_rule({"cookie": {"a": "b"}}, ["t"])
        self.assertIn("'cookie'", str(e.exception))
        self.assertEqual(
            MATCH_KEYS, ("header", "path", "query", "metadata", "method", "calling_aet", "called_aet", "operation")
        )


class RuleTargetsTests(SynchronousTestCase):
    RULES = [
        compile_rule({"header": {"X-Tenant": "a"}}, ["api1"]),
        compile_rule({"calling_aet": ["CT1", "MR*"]}, ["api2"]),
        compile_rule({"method": "GET"}, ["api2", "api3"]),
    ]

    def test_first_matching_rule_wins(self):
        env = envelope(method="GET", headers=[("X-Tenant", "a")])
        self.assertEqual(rule_targets(self.RULES, env), ("api1",))
        self.assertEqual(rule_targets(self.RULES[1:], env), ("api2", "api3"))
        self.assertEqual(
            rule_targets(self.RULES, envelope(method="DIMSE", dicom=DicomRequest("find", calling_aet="MR1"))), ("api2",)
        )

    def test_no_match(self):
        self.assertIsNone(rule_targets(self.RULES, envelope(method="POST")))
        self.assertIsNone(rule_targets([], envelope()))


class HashKeyTests(SynchronousTestCase):
    def test_valid_specs(self):
        for spec in ("client_ip", "calling_aet", "header:X-Patient-ID", "query:patient", "metadata:jwt.sub"):
            self.assertIsNone(check_hash_key(spec), spec)

    def test_invalid_specs(self):
        for spec in ("", "header:", "header", "cookie:a", "client", "query: x", "metadata:", 5, None, ["client_ip"]):
            message = check_hash_key(spec)
            self.assertEqual(
                message,
                f"must be header:<name>, query:<name>, metadata:<key>, client_ip or calling_aet (got {spec!r})",
            )

    def test_header(self):
        env = envelope(headers=[("x-patient-id", "p1"), ("X-Patient-ID", "p2")])
        self.assertEqual(request_key("header:X-Patient-ID", env), "p1")
        self.assertIsNone(request_key("header:X-Other", env))

    def test_query(self):
        env = envelope(query={"patient": ["p1", "p2"], "empty": []})
        self.assertEqual(request_key("query:patient", env), "p1")
        self.assertIsNone(request_key("query:empty", env))
        self.assertIsNone(request_key("query:missing", env))

    def test_metadata(self):
        env = envelope(metadata={"jwt.sub": "svc", "n": 7})
        self.assertEqual(request_key("metadata:jwt.sub", env), "svc")
        self.assertEqual(request_key("metadata:n", env), "7")
        self.assertIsNone(request_key("metadata:missing", env))

    def test_client_ip(self):
        self.assertEqual(request_key("client_ip", envelope(client=("10.0.0.5", 5555))), "10.0.0.5")
        self.assertIsNone(request_key("client_ip", envelope()))

    def test_calling_aet(self):
        self.assertEqual(request_key("calling_aet", envelope(dicom=DicomRequest("find", calling_aet="CT1"))), "CT1")
        self.assertIsNone(request_key("calling_aet", envelope(dicom=DicomRequest("find"))))
        self.assertIsNone(request_key("calling_aet", envelope()))

    def test_invalid(self):
        with self.assertRaises(ValueError) as e:
            request_key("cookie:x", envelope())
        self.assertIn("(got 'cookie:x')", str(e.exception))
