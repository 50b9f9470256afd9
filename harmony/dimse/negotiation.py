# -*- test-case-name: tests.unit.test_dimse_negotiation -*-
"""
Presentation context and SCP/SCU role negotiation (PS3.8 9.3.2.2, 9.3.3.2,
PS3.7 D.3.3.4), for the association acceptor and the requestor.

Sans-IO: works on the model objects of L{harmony.dimse.pdu}.
"""

import attr

from harmony.dimse.pdu import PresentationContextAC, RoleSelection

#: Presentation context results (PS3.8 9.3.3.2).
ACCEPTANCE = 0
USER_REJECTION = 1
NO_REASON = 2
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class NegotiationError(Exception):
    """
    The peer's answer does not match what was proposed (a protocol error:
    the requestor aborts the association).
    """


@attr.s(slots=True, frozen=True)
class AcceptedContext:
    """
    A presentation context both sides agreed on.

    @ivar id: the presentation context ID (odd, 1-255).
    @ivar abstract_syntax: the SOP class UID.
    @ivar transfer_syntax: the single transfer syntax accepted.
    @ivar requestor_scu: the requestor may act as SCU on it.
    @ivar requestor_scp: the requestor may act as SCP on it (for example the
        storage sub-operations of C-GET).
    """

    id = attr.ib()
    abstract_syntax = attr.ib()
    transfer_syntax = attr.ib()
    requestor_scu = attr.ib(default=True)
    requestor_scp = attr.ib(default=False)


@attr.s(slots=True, frozen=True)
class AcceptorPolicy:
    """
    What an acceptor supports.

    @ivar syntaxes: abstract syntax -> the transfer syntaxes accepted for
        it (a mapping; an abstract syntax not in it is not supported).
    @ivar requestor_scp_allowed: abstract syntaxes for which the requestor
        may take the SCP role when it proposes it.
    @ivar prefer_own_order: choose the transfer syntax by the acceptor's
        order (C{True}) or by the requestor's (C{False}, the default: the
        sender's preference, no transcoding needed).
    """

    syntaxes = attr.ib()
    requestor_scp_allowed = attr.ib(factory=frozenset, converter=frozenset)
    prefer_own_order = attr.ib(default=False)


def negotiate_as_acceptor(requested, policy, roles=()):
    """
    Answer the proposed presentation contexts.

    @param requested: the A-ASSOCIATE-RQ's
        L{harmony.dimse.pdu.PresentationContextRQ} list.
    @param policy: an L{AcceptorPolicy}.
    @param roles: the RQ's L{RoleSelection} items.
    @return: C{(ac_contexts, accepted, role_replies)}: the
        L{PresentationContextAC} list for the A-ASSOCIATE-AC (same order as
        requested), the accepted contexts by ID (L{AcceptedContext}), and
        the L{RoleSelection} replies (one per proposed item whose abstract
        syntax was accepted on some context).
    """
    proposed_roles = {r.abstract_syntax: r for r in roles}
    ac, accepted, replies = [], {}, {}
    for context in requested:
        supported = policy.syntaxes.get(context.abstract_syntax)
        if supported is None:
            ac.append(PresentationContextAC(context.id, ABSTRACT_SYNTAX_NOT_SUPPORTED, None))
            continue
        chosen = _choose(context.transfer_syntaxes, supported, policy.prefer_own_order)
        if chosen is None:
            ac.append(PresentationContextAC(context.id, TRANSFER_SYNTAXES_NOT_SUPPORTED, None))
            continue
        scu, scp = True, False
        role = proposed_roles.get(context.abstract_syntax)
        if role is not None:
            scu = role.scu
            scp = role.scp and context.abstract_syntax in policy.requestor_scp_allowed
        if not scu and not scp:
            # The requestor offered only a role we refuse: nothing can be
            # done on this context (and no role reply for it).
            ac.append(PresentationContextAC(context.id, USER_REJECTION, None))
            continue
        if role is not None:
            replies[context.abstract_syntax] = RoleSelection(context.abstract_syntax, scu, scp)
        ac.append(PresentationContextAC(context.id, ACCEPTANCE, chosen))
        accepted[context.id] = AcceptedContext(context.id, context.abstract_syntax, chosen, scu, scp)
    return ac, accepted, list(replies.values())


def _choose(proposed, supported, prefer_own_order):
    if prefer_own_order:
        wanted = set(proposed)
        for ts in supported:
            if ts in wanted:
                return ts
        return None
    supported = set(supported)
    for ts in proposed:
        if ts in supported:
            return ts
    return None


def negotiate_as_requestor(requested, answered, roles=(), role_replies=()):
    """
    Check the acceptor's answer against what was proposed.

    @param requested: the L{PresentationContextRQ} list that was sent.
    @param answered: the A-ASSOCIATE-AC's L{PresentationContextAC} list.
    @param roles: the L{RoleSelection} items that were sent.
    @param role_replies: the AC's L{RoleSelection} items.
    @return: accepted contexts by ID (L{AcceptedContext}).
    @raise NegotiationError: an answer for a context that was not
        proposed, or a transfer syntax that was not offered.
    """
    proposed = {c.id: c for c in requested}
    asked = {r.abstract_syntax: r for r in roles}
    replied = {r.abstract_syntax: r for r in role_replies}
    accepted = {}
    for answer in answered:
        context = proposed.get(answer.id)
        if context is None:
            raise NegotiationError(f"answer for presentation context {answer.id}, which was not proposed")
        if answer.result != ACCEPTANCE:
            continue
        if answer.transfer_syntax not in context.transfer_syntaxes:
            raise NegotiationError(
                f"presentation context {answer.id} accepted with a transfer syntax that was not proposed"
            )
        scu, scp = True, False
        ask = asked.get(context.abstract_syntax)
        if ask is not None:
            reply = replied.get(context.abstract_syntax)
            if reply is None:
                # No reply item: the acceptor does not do role selection,
                # the default roles apply (PS3.7 D.3.3.4).
                scu, scp = True, False
            else:
                scu, scp = ask.scu and reply.scu, ask.scp and reply.scp
        if not scu and not scp:
            continue
        accepted[answer.id] = AcceptedContext(answer.id, context.abstract_syntax, answer.transfer_syntax, scu, scp)
    return accepted


def contexts_for(syntaxes):
    """
    Presentation contexts to propose, one per C{(abstract syntax,
    [transfer syntax, ...])} item in order (an abstract syntax may come
    several times, e.g. once per transfer syntax so that the acceptor can
    accept each), odd IDs from 1.

    @raise ValueError: more than 128 contexts.
    """
    from harmony.dimse.pdu import PresentationContextRQ

    syntaxes = list(syntaxes)
    if len(syntaxes) > 128:
        raise ValueError("at most 128 presentation contexts can be proposed")
    return [PresentationContextRQ(2 * i + 1, abstract, list(offered)) for i, (abstract, offered) in enumerate(syntaxes)]


def build_contexts(abstract_syntaxes, transfer_syntaxes):
    """
    Presentation contexts to propose: one per abstract syntax, odd IDs from
    1, each offering C{transfer_syntaxes} (a list, or a mapping abstract
    syntax -> list).

    @raise ValueError: more than 128 contexts.
    """
    from harmony.dimse.pdu import PresentationContextRQ

    abstract_syntaxes = list(abstract_syntaxes)
    if len(abstract_syntaxes) > 128:
        raise ValueError("at most 128 presentation contexts can be proposed")
    contexts = []
    for i, abstract in enumerate(abstract_syntaxes):
        offered = transfer_syntaxes[abstract] if isinstance(transfer_syntaxes, dict) else transfer_syntaxes
        contexts.append(PresentationContextRQ(2 * i + 1, abstract, list(offered)))
    return contexts
