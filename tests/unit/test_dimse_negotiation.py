"""
Presentation context and SCP/SCU role negotiation (harmony.dimse.negotiation),
for the acceptor and the requestor.
"""

import pytest

from harmony.dimse.negotiation import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    NO_REASON,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    USER_REJECTION,
    AcceptedContext,
    AcceptorPolicy,
    NegotiationError,
    build_contexts,
    negotiate_as_acceptor,
    negotiate_as_requestor,
)
from harmony.dimse.pdu import PresentationContextAC, PresentationContextRQ, RoleSelection

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
UNKNOWN = "1.2.3.4.5"


def rq(context_id, abstract, *transfer_syntaxes):
    return PresentationContextRQ(context_id, abstract, list(transfer_syntaxes))


# ---------------------------------------------------------------------------
# Acceptor
# ---------------------------------------------------------------------------


class TestAcceptor:
    policy = AcceptorPolicy(
        {
            VERIFICATION: [IMPLICIT, EXPLICIT],
            CT: [EXPLICIT, IMPLICIT, RLE],
            MR: [IMPLICIT],
        }
    )

    def test_accepts_supported(self):
        ac, accepted, roles = negotiate_as_acceptor([rq(1, VERIFICATION, IMPLICIT)], self.policy)
        assert ac == [PresentationContextAC(1, ACCEPTANCE, IMPLICIT)]
        assert accepted == {1: AcceptedContext(1, VERIFICATION, IMPLICIT, True, False)}
        assert roles == []

    def test_unsupported_abstract_syntax(self):
        ac, accepted, roles = negotiate_as_acceptor([rq(1, UNKNOWN, IMPLICIT)], self.policy)
        assert ac == [PresentationContextAC(1, ABSTRACT_SYNTAX_NOT_SUPPORTED, None)]
        assert ac[0].result == 3
        assert accepted == {}
        assert roles == []

    def test_no_common_transfer_syntax(self):
        ac, accepted, _ = negotiate_as_acceptor([rq(3, MR, EXPLICIT, BIG)], self.policy)
        assert ac == [PresentationContextAC(3, TRANSFER_SYNTAXES_NOT_SUPPORTED, None)]
        assert ac[0].result == 4
        assert accepted == {}

    def test_no_transfer_syntax_proposed(self):
        ac, accepted, _ = negotiate_as_acceptor([rq(1, CT)], self.policy)
        assert ac[0].result == TRANSFER_SYNTAXES_NOT_SUPPORTED
        assert accepted == {}

    def test_requestor_order_by_default(self):
        ac, accepted, _ = negotiate_as_acceptor([rq(1, CT, RLE, IMPLICIT, EXPLICIT)], self.policy)
        assert ac[0].transfer_syntax == RLE
        assert accepted[1].transfer_syntax == RLE
        # Syntaxes we do not support are skipped, in the requestor's order.
        ac, _, _ = negotiate_as_acceptor([rq(1, CT, BIG, IMPLICIT, EXPLICIT)], self.policy)
        assert ac[0].transfer_syntax == IMPLICIT

    def test_prefer_own_order(self):
        policy = AcceptorPolicy(self.policy.syntaxes, prefer_own_order=True)
        ac, accepted, _ = negotiate_as_acceptor([rq(1, CT, RLE, IMPLICIT, EXPLICIT)], policy)
        assert ac[0].transfer_syntax == EXPLICIT
        ac, _, _ = negotiate_as_acceptor([rq(1, CT, BIG, RLE, IMPLICIT)], policy)
        assert ac[0].transfer_syntax == IMPLICIT
        ac, _, _ = negotiate_as_acceptor([rq(1, CT, BIG, DEFLATED)], policy)
        assert ac[0].result == TRANSFER_SYNTAXES_NOT_SUPPORTED

    def test_answers_in_requested_order(self):
        requested = [
            rq(7, UNKNOWN, IMPLICIT),
            rq(1, CT, EXPLICIT),
            rq(5, MR, EXPLICIT),
            rq(3, VERIFICATION, IMPLICIT),
        ]
        ac, accepted, _ = negotiate_as_acceptor(requested, self.policy)
        assert [(c.id, c.result) for c in ac] == [
            (7, ABSTRACT_SYNTAX_NOT_SUPPORTED),
            (1, ACCEPTANCE),
            (5, TRANSFER_SYNTAXES_NOT_SUPPORTED),
            (3, ACCEPTANCE),
        ]
        assert sorted(accepted) == [1, 3]
        assert accepted[1].abstract_syntax == CT
        assert accepted[3].abstract_syntax == VERIFICATION

    def test_same_abstract_syntax_on_several_contexts(self):
        # One context per transfer syntax, as storescu proposes them.
        requested = [rq(1, CT, RLE), rq(3, CT, EXPLICIT), rq(5, CT, BIG), rq(7, CT, IMPLICIT)]
        ac, accepted, _ = negotiate_as_acceptor(requested, self.policy)
        assert [(c.id, c.result, c.transfer_syntax) for c in ac] == [
            (1, ACCEPTANCE, RLE),
            (3, ACCEPTANCE, EXPLICIT),
            (5, TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
            (7, ACCEPTANCE, IMPLICIT),
        ]
        assert {i: c.transfer_syntax for i, c in accepted.items()} == {1: RLE, 3: EXPLICIT, 7: IMPLICIT}
        assert all(c.abstract_syntax == CT for c in accepted.values())

    def test_empty_request(self):
        assert negotiate_as_acceptor([], self.policy) == ([], {}, [])

    # -- roles ---------------------------------------------------------------

    def test_no_role_items_default_roles(self):
        _, accepted, roles = negotiate_as_acceptor([rq(1, CT, EXPLICIT)], self.policy)
        assert (accepted[1].requestor_scu, accepted[1].requestor_scp) == (True, False)
        assert roles == []

    def test_requestor_scp_role_allowed(self):
        policy = AcceptorPolicy(self.policy.syntaxes, requestor_scp_allowed={CT})
        _, accepted, roles = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT)], policy, [RoleSelection(CT, True, True)]
        )
        assert (accepted[1].requestor_scu, accepted[1].requestor_scp) == (True, True)
        assert roles == [RoleSelection(CT, True, True)]

    def test_requestor_scp_role_not_allowed(self):
        # SCU+SCP proposed, SCP refused: the context stays with SCU only.
        _, accepted, roles = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT)], self.policy, [RoleSelection(CT, True, True)]
        )
        assert (accepted[1].requestor_scu, accepted[1].requestor_scp) == (True, False)
        assert roles == [RoleSelection(CT, True, False)]

    def test_requestor_scp_allowed_for_another_class_only(self):
        policy = AcceptorPolicy(self.policy.syntaxes, requestor_scp_allowed={MR})
        _, accepted, roles = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT)], policy, [RoleSelection(CT, True, True)]
        )
        assert accepted[1].requestor_scp is False
        assert roles == [RoleSelection(CT, True, False)]

    def test_scp_only_proposal_allowed(self):
        policy = AcceptorPolicy(self.policy.syntaxes, requestor_scp_allowed=[CT])
        ac, accepted, roles = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT)], policy, [RoleSelection(CT, False, True)]
        )
        assert ac[0].result == ACCEPTANCE
        assert (accepted[1].requestor_scu, accepted[1].requestor_scp) == (False, True)
        assert roles == [RoleSelection(CT, False, True)]

    def test_scp_only_proposal_refused(self):
        ac, accepted, roles = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT)], self.policy, [RoleSelection(CT, False, True)]
        )
        assert ac == [PresentationContextAC(1, USER_REJECTION, None)]
        assert ac[0].result == 1
        assert accepted == {}
        # No role reply for a context that was not accepted (as pynetdicom).
        assert roles == []

    def test_neither_role_proposed(self):
        ac, accepted, _ = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT)], self.policy, [RoleSelection(CT, False, False)]
        )
        assert ac[0].result == USER_REJECTION
        assert accepted == {}

    def test_role_item_for_unproposed_or_unsupported_class(self):
        # No reply for a role item whose abstract syntax is not accepted on
        # any context (not proposed, or not supported).
        ac, accepted, roles = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT), rq(3, UNKNOWN, EXPLICIT)],
            self.policy,
            [RoleSelection(MR, True, True), RoleSelection(UNKNOWN, True, True)],
        )
        assert [c.result for c in ac] == [ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED]
        assert roles == []
        assert accepted[1].requestor_scp is False

    def test_one_role_reply_per_abstract_syntax(self):
        policy = AcceptorPolicy(self.policy.syntaxes, requestor_scp_allowed={CT})
        ac, accepted, roles = negotiate_as_acceptor(
            [rq(1, CT, EXPLICIT), rq(3, CT, IMPLICIT), rq(5, MR, IMPLICIT)],
            policy,
            [RoleSelection(CT, True, True), RoleSelection(MR, True, False)],
        )
        assert [c.result for c in ac] == [ACCEPTANCE] * 3
        assert sorted(roles, key=lambda r: r.abstract_syntax) == sorted(
            [RoleSelection(CT, True, True), RoleSelection(MR, True, False)], key=lambda r: r.abstract_syntax
        )
        assert accepted[1].requestor_scp and accepted[3].requestor_scp
        assert not accepted[5].requestor_scp

    def test_policy_converts_allowed_to_frozenset(self):
        policy = AcceptorPolicy({}, requestor_scp_allowed=[CT, CT])
        assert policy.requestor_scp_allowed == frozenset({CT})
        assert AcceptorPolicy({}).prefer_own_order is False


# ---------------------------------------------------------------------------
# Requestor
# ---------------------------------------------------------------------------


class TestRequestor:
    requested = [
        rq(1, VERIFICATION, IMPLICIT),
        rq(3, CT, EXPLICIT, IMPLICIT),
        rq(5, MR, IMPLICIT),
    ]

    def test_all_accepted(self):
        answered = [
            PresentationContextAC(1, ACCEPTANCE, IMPLICIT),
            PresentationContextAC(3, ACCEPTANCE, IMPLICIT),
            PresentationContextAC(5, ACCEPTANCE, IMPLICIT),
        ]
        accepted = negotiate_as_requestor(self.requested, answered)
        assert accepted == {
            1: AcceptedContext(1, VERIFICATION, IMPLICIT, True, False),
            3: AcceptedContext(3, CT, IMPLICIT, True, False),
            5: AcceptedContext(5, MR, IMPLICIT, True, False),
        }

    def test_rejected_contexts_skipped(self):
        answered = [
            PresentationContextAC(1, USER_REJECTION, None),
            PresentationContextAC(3, ACCEPTANCE, EXPLICIT),
            PresentationContextAC(5, TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
        ]
        accepted = negotiate_as_requestor(self.requested, answered)
        assert list(accepted) == [3]
        assert accepted[3].transfer_syntax == EXPLICIT

    @pytest.mark.parametrize(
        "result", [USER_REJECTION, NO_REASON, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED]
    )
    def test_each_rejection_result(self, result):
        # A rejected context's transfer syntax field is not significant.
        answered = [PresentationContextAC(3, result, "1.2.3.999")]
        assert negotiate_as_requestor(self.requested, answered) == {}

    def test_answer_for_unknown_context(self):
        answered = [PresentationContextAC(7, ACCEPTANCE, IMPLICIT)]
        with pytest.raises(NegotiationError, match="7"):
            negotiate_as_requestor(self.requested, answered)
        # Even a rejection for a context that was not proposed is an error.
        with pytest.raises(NegotiationError):
            negotiate_as_requestor(self.requested, [PresentationContextAC(2, USER_REJECTION, None)])

    def test_transfer_syntax_not_proposed(self):
        answered = [PresentationContextAC(5, ACCEPTANCE, EXPLICIT)]
        with pytest.raises(NegotiationError, match="not proposed"):
            negotiate_as_requestor(self.requested, answered)

    def test_not_every_context_answered(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT)]
        assert list(negotiate_as_requestor(self.requested, answered)) == [3]

    # -- roles ---------------------------------------------------------------

    def test_role_reply_grants_scp(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT)]
        accepted = negotiate_as_requestor(
            self.requested, answered, [RoleSelection(CT, True, True)], [RoleSelection(CT, True, True)]
        )
        assert (accepted[3].requestor_scu, accepted[3].requestor_scp) == (True, True)

    def test_role_reply_refuses_scp(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT)]
        accepted = negotiate_as_requestor(
            self.requested, answered, [RoleSelection(CT, True, True)], [RoleSelection(CT, True, False)]
        )
        assert (accepted[3].requestor_scu, accepted[3].requestor_scp) == (True, False)

    def test_role_reply_cannot_grant_what_was_not_asked(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT)]
        accepted = negotiate_as_requestor(
            self.requested, answered, [RoleSelection(CT, True, False)], [RoleSelection(CT, True, True)]
        )
        assert (accepted[3].requestor_scu, accepted[3].requestor_scp) == (True, False)

    def test_no_role_reply_means_default_roles(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT)]
        accepted = negotiate_as_requestor(self.requested, answered, [RoleSelection(CT, True, True)], [])
        assert (accepted[3].requestor_scu, accepted[3].requestor_scp) == (True, False)
        # SCP only asked, no reply: the default (SCU) role applies.
        accepted = negotiate_as_requestor(self.requested, answered, [RoleSelection(CT, False, True)], [])
        assert (accepted[3].requestor_scu, accepted[3].requestor_scp) == (True, False)

    def test_role_reply_without_request_ignored(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT)]
        accepted = negotiate_as_requestor(self.requested, answered, [], [RoleSelection(CT, False, True)])
        assert (accepted[3].requestor_scu, accepted[3].requestor_scp) == (True, False)

    def test_scp_only_granted(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT)]
        accepted = negotiate_as_requestor(
            self.requested, answered, [RoleSelection(CT, False, True)], [RoleSelection(CT, False, True)]
        )
        assert (accepted[3].requestor_scu, accepted[3].requestor_scp) == (False, True)

    def test_no_usable_role_drops_the_context(self):
        answered = [PresentationContextAC(3, ACCEPTANCE, EXPLICIT), PresentationContextAC(5, ACCEPTANCE, IMPLICIT)]
        accepted = negotiate_as_requestor(
            self.requested, answered, [RoleSelection(CT, False, True)], [RoleSelection(CT, False, False)]
        )
        assert list(accepted) == [5]

    def test_role_applies_to_every_context_of_the_class(self):
        requested = [rq(1, CT, EXPLICIT), rq(3, CT, IMPLICIT)]
        answered = [PresentationContextAC(1, ACCEPTANCE, EXPLICIT), PresentationContextAC(3, ACCEPTANCE, IMPLICIT)]
        accepted = negotiate_as_requestor(
            requested, answered, [RoleSelection(CT, True, True)], [RoleSelection(CT, True, True)]
        )
        assert all(c.requestor_scp for c in accepted.values())


class TestRoundTrip:
    def test_acceptor_answer_satisfies_requestor(self):
        requested = build_contexts([VERIFICATION, CT, UNKNOWN, MR], [EXPLICIT, IMPLICIT])
        roles = [RoleSelection(CT, True, True), RoleSelection(MR, True, True)]
        policy = AcceptorPolicy(
            {VERIFICATION: [IMPLICIT], CT: [IMPLICIT, EXPLICIT], MR: [IMPLICIT]},
            requestor_scp_allowed={MR},
        )
        ac, accepted_by_acceptor, replies = negotiate_as_acceptor(requested, policy, roles)
        accepted_by_requestor = negotiate_as_requestor(requested, ac, roles, replies)
        assert accepted_by_requestor == accepted_by_acceptor
        assert accepted_by_requestor[3].requestor_scp is False
        assert accepted_by_requestor[7].requestor_scp is True
        assert 5 not in accepted_by_requestor


# ---------------------------------------------------------------------------
# build_contexts
# ---------------------------------------------------------------------------


class TestBuildContexts:
    def test_odd_ids_from_one(self):
        contexts = build_contexts([VERIFICATION, CT, MR], [EXPLICIT, IMPLICIT])
        assert [c.id for c in contexts] == [1, 3, 5]
        assert [c.abstract_syntax for c in contexts] == [VERIFICATION, CT, MR]
        assert all(c.transfer_syntaxes == [EXPLICIT, IMPLICIT] for c in contexts)
        # Each context gets its own list.
        contexts[0].transfer_syntaxes.append(RLE)
        assert contexts[1].transfer_syntaxes == [EXPLICIT, IMPLICIT]

    def test_transfer_syntaxes_by_abstract_syntax(self):
        contexts = build_contexts(
            iter([VERIFICATION, CT]), {VERIFICATION: [IMPLICIT], CT: (RLE, EXPLICIT)}
        )
        assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in contexts] == [
            (1, VERIFICATION, [IMPLICIT]),
            (3, CT, [RLE, EXPLICIT]),
        ]

    def test_limit_128(self):
        syntaxes = [f"1.2.3.{i}" for i in range(128)]
        contexts = build_contexts(syntaxes, [IMPLICIT])
        assert len(contexts) == 128
        assert contexts[-1].id == 255
        assert all(c.id % 2 == 1 for c in contexts)
        assert len({c.id for c in contexts}) == 128
        with pytest.raises(ValueError, match="128"):
            build_contexts(syntaxes + ["1.2.3.999"], [IMPLICIT])

    def test_empty(self):
        assert build_contexts([], [IMPLICIT]) == []


def test_contexts_for_keeps_repeated_abstract_syntaxes():
    from harmony.dimse.negotiation import contexts_for

    contexts = contexts_for([(CT, [EXPLICIT]), (MR, [IMPLICIT, EXPLICIT]), (CT, [IMPLICIT])])
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in contexts] == [
        (1, CT, [EXPLICIT]),
        (3, MR, [IMPLICIT, EXPLICIT]),
        (5, CT, [IMPLICIT]),
    ]
    assert len(contexts_for([(CT, [EXPLICIT])] * 128)) == 128
    with pytest.raises(ValueError):
        contexts_for([(CT, [EXPLICIT])] * 129)
