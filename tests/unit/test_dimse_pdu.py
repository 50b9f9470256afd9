"""
Tests for L{harmony.dimse.pdu}: framing, the PDU model, decoding against
pynetdicom's shipped PDU vectors and byte-identity with pynetdicom's
encoders.
"""

import random
import struct

import attr
from pynetdicom import pdu as pyn_pdu
from pynetdicom import pdu_items as pyn_items
from pynetdicom import pdu_primitives as pyn_prim
from pynetdicom.presentation import PresentationContext
from pynetdicom.tests import encoded_pdu_items as vectors
from twisted.trial.unittest import SynchronousTestCase

from harmony.dimse import pdu
from harmony.dimse.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PDataTF,
    PDUError,
    PDUFramer,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    UserIdentityRQ,
    decode_pdu,
    encode_p_data_tf,
    encode_pdu,
    iter_pdvs,
    p_data_tf_header,
)

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG = "1.2.840.10008.1.2.2"
PYN_CLASS_UID = "1.2.826.0.1.3680043.9.3811.0.9.0"
DCMTK_CLASS_UID = "1.2.276.0.7230010.3.0.3.6.0"

#: Every whole-PDU vector pynetdicom ships (name -> bytes).
PDU_VECTORS = {
    name: getattr(vectors, name)
    for name in dir(vectors)
    if name.startswith(("a_associate", "a_release", "a_abort", "a_p_abort", "p_data_tf"))
}

#: Vectors that do not survive decode/encode byte for byte, and why.
#: - a_associate_ac_user: its PDU length field says 184 but 198 bytes follow
#:   (the vector is wrong; the re-encoding has the right length).
#: - a_associate_ac_no_ts: a rejected context without a Transfer Syntax
#:   sub-item; we always send the mandatory sub-item (empty when rejected).
#: - a_associate_rq_user_id_user_pass: a reserved byte is 0xFF; reserved
#:   bytes are sent as 0.
#: - a_associate_rq_called / _calling: a 16-space AE title cannot be sent.


def _fixed_length(data):
    return data[:2] + struct.pack(">I", len(data) - 6) + data[6:]


def _decode(data):
    return decode_pdu(data[0], data[6:])


def _pynetdicom_p_data(items):
    p = pyn_pdu.P_DATA_TF()
    for context_id, control, data in items:
        pdv = pyn_items.PresentationDataValueItem()
        pdv.presentation_context_id = context_id
        pdv.presentation_data_value = bytes([control]) + bytes(data)
        p.presentation_data_value_items.append(pdv)
    return p.encode()


def _item(item_type, value):
    return struct.pack(">BxH", item_type, len(value)) + value


def _rq_body(items, called=b"ANY-SCP", calling=b"ECHOSCU"):
    """An A-ASSOCIATE-RQ variable field with the given variable items."""
    return b"\x00\x01\x00\x00" + called.ljust(16) + calling.ljust(16) + b"\x00" * 32 + b"".join(items)


APP_CONTEXT = _item(0x10, b"1.2.840.10008.3.1.1.1")
MAX_LENGTH = _item(0x51, struct.pack(">I", 16384))
CLASS_UID = _item(0x52, PYN_CLASS_UID.encode())


def _context_rq(context_id=1, subs=None):
    if subs is None:
        subs = [_item(0x30, VERIFICATION.encode()), _item(0x40, IMPLICIT.encode())]
    return _item(0x20, bytes([context_id, 0, 0, 0]) + b"".join(subs))


def _user_info(*subs):
    if not subs:
        subs = (MAX_LENGTH, CLASS_UID)
    return _item(0x50, b"".join(subs))


def _ac_body(contexts, user_info=None):
    return (
        b"\x00\x01\x00\x00"
        + b"ANY-SCP".ljust(16)
        + b"ECHOSCU".ljust(16)
        + b"\x00" * 32
        + APP_CONTEXT
        + b"".join(contexts)
        + (user_info or _user_info())
    )


class GoldenVectorDecodeTests(SynchronousTestCase):
    """
    pynetdicom's vectors decode to the values their comments describe.
    """

    def test_associate_rq(self):
        rq = _decode(vectors.a_associate_rq)
        self.assertEqual(
            rq,
            AssociateRQ(
                called_aet="ANY-SCP",
                calling_aet="ECHOSCU",
                contexts=[PresentationContextRQ(1, VERIFICATION, [IMPLICIT])],
                max_pdu_length=16382,
                implementation_class_uid=PYN_CLASS_UID,
                implementation_version_name="PYNETDICOM_090",
            ),
        )
        self.assertIs(type(rq.contexts[0].abstract_syntax), str)
        self.assertIs(type(rq.implementation_class_uid), str)

    def test_associate_rq_user_identity_and_async_ops(self):
        rq = _decode(vectors.a_associate_rq_user_async)
        self.assertEqual(rq.user_identity, UserIdentityRQ(1, b"pynetdicom", b"", True))
        self.assertEqual(rq.async_ops, (5, 5))
        self.assertEqual(rq.roles, [])
        self.assertEqual(rq.extended_negotiation, [])

    def test_associate_rq_role_selection(self):
        rq = _decode(vectors.a_associate_rq_role)
        self.assertEqual(rq.calling_aet, "GETSCU")
        self.assertEqual(rq.contexts, [PresentationContextRQ(1, CT, [EXPLICIT])])
        self.assertEqual(rq.roles, [RoleSelection(CT, False, True)])

    def test_associate_rq_username_and_passcode(self):
        rq = _decode(vectors.a_associate_rq_user_id_user_pass)
        self.assertEqual(rq.calling_aet, "STORESCU")
        self.assertEqual(rq.contexts, [PresentationContextRQ(1, CT, [EXPLICIT, BIG, IMPLICIT])])
        self.assertEqual(rq.user_identity, UserIdentityRQ(2, b"pynetdicom", b"p4ssw0rd", False))
        self.assertEqual(rq.implementation_class_uid, DCMTK_CLASS_UID)
        self.assertEqual(rq.implementation_version_name, "OFFIS_DCMTK_360")
        self.assertEqual(rq.max_pdu_length, 16384)

    def test_associate_rq_extended_negotiation_kept_opaque(self):
        rq = _decode(vectors.a_associate_rq_user_id_ext_neg)
        self.assertEqual([c.id for c in rq.contexts], [1, 3, 5])
        self.assertEqual([c.abstract_syntax for c in rq.contexts], [VERIFICATION, CT, MR])
        self.assertEqual(rq.user_identity, UserIdentityRQ(1, b"pynetdicom", b"", True))
        self.assertEqual(rq.async_ops, (5, 5))
        self.assertEqual(len(rq.extended_negotiation), 2)
        self.assertEqual(rq.extended_negotiation[0], vectors.extended_negotiation)
        item = pyn_items.SOPClassExtendedNegotiationSubItem()
        item.decode(rq.extended_negotiation[1])
        self.assertEqual(item.sop_class_uid, MR)
        self.assertEqual(item.service_class_application_information, b"\x02\x00\x03\x00\x01\x00")

    def test_associate_ac_common_extended_negotiation(self):
        # Named "rq" in pynetdicom, but it is an A-ASSOCIATE-AC.
        ac = _decode(vectors.a_associate_rq_com_ext_neg)
        self.assertIsInstance(ac, AssociateAC)
        self.assertEqual(
            ac.contexts,
            [
                PresentationContextAC(1, 0, IMPLICIT),
                PresentationContextAC(3, 0, IMPLICIT),
                PresentationContextAC(5, 0, IMPLICIT),
            ],
        )
        self.assertEqual(ac.extended_negotiation, [vectors.common_extended_negotiation])

    def test_associate_ac(self):
        ac = _decode(vectors.a_associate_ac)
        self.assertEqual(
            ac,
            AssociateAC(
                called_aet="ANY-SCP",
                calling_aet="ECHOSCU",
                contexts=[PresentationContextAC(1, 0, IMPLICIT)],
                max_pdu_length=16384,
                implementation_class_uid=DCMTK_CLASS_UID,
                implementation_version_name="OFFIS_DCMTK_360",
            ),
        )

    def test_associate_ac_user_identity_response(self):
        ac = _decode(vectors.a_associate_ac_user)
        self.assertEqual(ac.user_identity_response, b"Accepted")

    def test_associate_ac_rejected_contexts(self):
        ac = _decode(vectors.a_associate_ac_zero_ts)
        self.assertEqual(ac.contexts, [PresentationContextAC(1, 0, EXPLICIT), PresentationContextAC(3, 3, None)])
        self.assertEqual(ac.calling_aet, "PYNETDICOM")
        self.assertEqual(ac.max_pdu_length, 28672)
        self.assertEqual(ac.implementation_class_uid, "2.16.840.1")
        self.assertEqual(ac.implementation_version_name, "MergeCOM3_390IB2")
        ac = _decode(vectors.a_associate_ac_no_ts)
        self.assertEqual(ac.contexts, [PresentationContextAC(1, 3, None)])

    def test_associate_rj(self):
        self.assertEqual(_decode(vectors.a_associate_rj), AssociateRJ(1, 1, 1))

    def test_release_and_abort(self):
        self.assertEqual(_decode(vectors.a_release_rq), ReleaseRQ())
        self.assertEqual(_decode(vectors.a_release_rp), ReleaseRP())
        self.assertEqual(_decode(vectors.a_abort), Abort(0, 0))
        self.assertEqual(_decode(vectors.a_p_abort), Abort(2, 4))

    def test_p_data_tf(self):
        p = _decode(vectors.p_data_tf)
        self.assertEqual(len(p.items), 1)
        context_id, control, data = p.items[0]
        self.assertEqual((context_id, control), (1, 3))
        self.assertEqual(bytes(data), vectors.presentation_data[1:])
        for name in ("p_data_tf_rq", "p_data_tf_n_event_report"):
            data = PDU_VECTORS[name]
            ours = [(c, h, bytes(d)) for c, h, d in _decode(data).items]
            theirs = pyn_pdu.P_DATA_TF()
            theirs.decode(data)
            self.assertEqual(
                ours,
                [
                    (i.presentation_context_id, i.presentation_data_value[0], i.presentation_data_value[1:])
                    for i in theirs.presentation_data_value_items
                ],
            )

    def test_all_spaces_ae_titles_decode_empty(self):
        """
        A 16-space AE title is decoded as an empty string (the acceptor
        then rejects the association: the title is not recognised) rather
        than aborting.
        """
        self.assertEqual(_decode(vectors.a_associate_rq_called).called_aet, "")
        self.assertEqual(_decode(vectors.a_associate_rq_calling).calling_aet, "")
        self.assertEqual(_decode(vectors.a_associate_rq_calling).called_aet, "ANY-")

    def test_decode_from_memoryview(self):
        data = vectors.a_associate_rq_user_id_ext_neg
        self.assertEqual(decode_pdu(data[0], memoryview(data)[6:]), _decode(data))


class GoldenVectorRoundTripTests(SynchronousTestCase):
    """
    encode(decode(x)) == x for pynetdicom's vectors.
    """

    def test_round_trips(self):
        exact = set(PDU_VECTORS) - {
            "a_associate_ac_user",
            "a_associate_ac_no_ts",
            "a_associate_rq_user_id_user_pass",
            "a_associate_rq_called",
            "a_associate_rq_calling",
        }
        self.assertGreaterEqual(len(exact), 15)
        for name in sorted(exact):
            data = PDU_VECTORS[name]
            self.assertEqual(encode_pdu(_decode(data)), data, name)

    def test_wrong_length_field_vector(self):
        data = vectors.a_associate_ac_user
        self.assertNotEqual(struct.unpack(">I", data[2:6])[0], len(data) - 6)
        self.assertEqual(encode_pdu(_decode(data)), _fixed_length(data))

    def test_rejected_context_gets_an_empty_transfer_syntax_sub_item(self):
        data = vectors.a_associate_ac_no_ts
        item = b"\x21\x00\x00\x04\x01\x00\x03\x00"
        expected = _fixed_length(data.replace(item, b"\x21\x00\x00\x08\x01\x00\x03\x00\x40\x00\x00\x00"))
        self.assertEqual(encode_pdu(_decode(data)), expected)

    def test_reserved_bytes_sent_as_zero(self):
        data = vectors.a_associate_rq_user_id_user_pass
        self.assertEqual(data[105], 0xFF)
        self.assertEqual(encode_pdu(_decode(data)), data[:105] + b"\x00" + data[106:])

    def test_all_spaces_ae_title_not_encodable(self):
        for name in ("a_associate_rq_called", "a_associate_rq_calling"):
            self.assertRaises(ValueError, encode_pdu, _decode(PDU_VECTORS[name]))


def _pynetdicom_associate(obj):
    """
    The same A-ASSOCIATE-RQ/AC encoded field by field with pynetdicom's
    own PDU and item classes.
    """
    requesting = isinstance(obj, AssociateRQ)
    out = pyn_pdu.A_ASSOCIATE_RQ() if requesting else pyn_pdu.A_ASSOCIATE_AC()
    out.protocol_version = obj.protocol_version
    if requesting:
        out.called_ae_title, out.calling_ae_title = obj.called_aet, obj.calling_aet
    else:
        out.reserved_aet, out.reserved_aec = obj.called_aet, obj.calling_aet
    item = pyn_items.ApplicationContextItem()
    item.application_context_name = obj.application_context
    out.variable_items.append(item)
    for context in obj.contexts:
        if requesting:
            item = pyn_items.PresentationContextItemRQ()
            item.presentation_context_id = context.id
            sub = pyn_items.AbstractSyntaxSubItem()
            sub.abstract_syntax_name = context.abstract_syntax
            item.abstract_transfer_syntax_sub_items.append(sub)
            for uid in context.transfer_syntaxes:
                sub = pyn_items.TransferSyntaxSubItem()
                sub.transfer_syntax_name = uid
                item.abstract_transfer_syntax_sub_items.append(sub)
        else:
            item = pyn_items.PresentationContextItemAC()
            item.presentation_context_id = context.id
            item.result_reason = context.result
            sub = pyn_items.TransferSyntaxSubItem()
            sub.transfer_syntax_name = context.transfer_syntax
            item.transfer_syntax_sub_item.append(sub)
        out.variable_items.append(item)
    user = []
    sub = pyn_items.MaximumLengthSubItem()
    sub.maximum_length_received = obj.max_pdu_length
    user.append(sub)
    sub = pyn_items.ImplementationClassUIDSubItem()
    sub.implementation_class_uid = obj.implementation_class_uid
    user.append(sub)
    if obj.implementation_version_name is not None:
        sub = pyn_items.ImplementationVersionNameSubItem()
        sub.implementation_version_name = obj.implementation_version_name
        user.append(sub)
    for role in obj.roles:
        sub = pyn_items.SCP_SCU_RoleSelectionSubItem()
        sub.sop_class_uid = role.abstract_syntax
        sub.scu_role, sub.scp_role = int(role.scu), int(role.scp)
        user.append(sub)
    if obj.async_ops is not None:
        sub = pyn_items.AsynchronousOperationsWindowSubItem()
        sub.maximum_number_operations_invoked, sub.maximum_number_operations_performed = obj.async_ops
        user.append(sub)
    item = pyn_items.UserInformationItem()
    item.user_data = user
    out.variable_items.append(item)
    return out.encode()


class AssociateEncodingTests(SynchronousTestCase):
    """
    A-ASSOCIATE-RQ/AC are assembled directly (the user information item
    cached by content): byte for byte what pynetdicom encodes.
    """

    def test_byte_identical_to_pynetdicom(self):
        contexts_rq = [PresentationContextRQ(1, VERIFICATION, [IMPLICIT]), PresentationContextRQ(3, CT, [EXPLICIT, IMPLICIT])]
        contexts_ac = [PresentationContextAC(1, 0, IMPLICIT), PresentationContextAC(3, 0, EXPLICIT)]
        for called, calling in (("ANY-SCP", "ECHOSCU"), ("A", "B" * 16), ("  LEAD", "MID DLE"), ("X" * 16, "y~!")):
            for max_length, version, roles, async_ops in (
                (16384, "HARMONY_1", [], None),
                (0, None, [RoleSelection(CT, False, True)], (1, 1)),
                (0xFFFFFFFF, "V", [RoleSelection(CT, True, True), RoleSelection(MR, False, True)], (0, 5)),
            ):
                common = dict(
                    called_aet=called, calling_aet=calling, max_pdu_length=max_length,
                    implementation_class_uid="1.2.826.0.1.3680043.9.3811.2", implementation_version_name=version,
                    roles=roles, async_ops=async_ops,
                )
                for obj in (AssociateRQ(contexts=contexts_rq, **common), AssociateAC(contexts=contexts_ac, **common)):
                    expected = _pynetdicom_associate(obj)
                    self.assertEqual(encode_pdu(obj), expected, obj)
                    self.assertEqual(encode_pdu(obj), expected, obj)  # from the cache
                    # Read back: AE titles arrive without their padding spaces.
                    stripped = attr.evolve(obj, called_aet=called.strip(), calling_aet=calling.strip())
                    self.assertEqual(_decode(expected), stripped)

    def test_invalid_fields_are_refused(self):
        good = dict(called_aet="ANY-SCP", calling_aet="ECHOSCU", contexts=[PresentationContextRQ(1, CT, [IMPLICIT])],
                    max_pdu_length=16384, implementation_class_uid="1.2.3")
        encode_pdu(AssociateRQ(**good))
        for bad in ({"called_aet": ""}, {"calling_aet": "X" * 17}, {"max_pdu_length": -1},
                    {"implementation_class_uid": ""}, {"application_context": "x" * 65}, {"protocol_version": 1 << 16}):
            self.assertRaises(ValueError, encode_pdu, AssociateRQ(**{**good, **bad}))


class PDataTFTests(SynchronousTestCase):
    """
    The P-DATA-TF fast path is byte-identical to pynetdicom.
    """

    CASES = [
        [(1, 3, vectors.presentation_data[1:])],
        [(1, 0, b"")],
        [(1, 2, b"x" * 17)],
        [(255, 1, bytes(range(256)) * 4096)],  # 1 MiB
        [(1, 3, b"\x00" * 66), (1, 0, b"dataset fragment"), (3, 2, b""), (5, 1, b"z" * 1000)],
        [(i | 1, i & 3, bytes([i]) * i) for i in range(0, 255, 2)],
    ]

    def test_byte_identical_to_pynetdicom(self):
        for items in self.CASES:
            self.assertEqual(encode_p_data_tf(items), _pynetdicom_p_data(items))
            self.assertEqual(encode_pdu(PDataTF(items)), _pynetdicom_p_data(items))

    def test_fragments_may_be_views(self):
        data = bytearray(b"0123456789" * 100)
        items = [(1, 0, memoryview(data)[10:500]), (1, 2, bytearray(b"abc"))]
        self.assertEqual(encode_p_data_tf(items), _pynetdicom_p_data(items))
        self.assertEqual(encode_p_data_tf(items[:1]), _pynetdicom_p_data(items[:1]))

    def test_header_for_zero_copy_writes(self):
        data = b"fragment" * 1000
        self.assertEqual(p_data_tf_header(7, 2, len(data)) + data, _pynetdicom_p_data([(7, 2, data)]))

    def test_round_trip(self):
        for items in self.CASES:
            encoded = encode_p_data_tf(items)
            decoded = decode_pdu(encoded[0], encoded[6:])
            self.assertEqual([(c, h, bytes(d)) for c, h, d in decoded.items], [(c, h, bytes(d)) for c, h, d in items])

    def test_iter_pdvs_does_not_copy(self):
        encoded = encode_p_data_tf(self.CASES[4])
        body = memoryview(encoded)[6:]
        pdvs = iter_pdvs(body)
        self.assertEqual([(c, h) for c, h, _ in pdvs], [(1, 3), (1, 0), (3, 2), (5, 1)])
        for _, _, fragment in pdvs:
            self.assertIsInstance(fragment, memoryview)
            self.assertIs(fragment.obj, encoded)
        single = iter_pdvs(encoded[6:])
        self.assertEqual(bytes(single[0][2]), b"\x00" * 66)
        self.assertIsInstance(single[0][2], memoryview)


class MalformedPDataTFTests(SynchronousTestCase):
    def assertReason(self, reason, body):
        e = self.assertRaises(PDUError, iter_pdvs, body)
        self.assertEqual(e.reason, reason)
        e = self.assertRaises(PDUError, decode_pdu, P_DATA_TF, body)
        self.assertEqual(e.reason, reason)

    def test_no_pdv(self):
        self.assertReason(6, b"")

    def test_truncated_pdv_header(self):
        self.assertReason(6, b"\x00\x00\x00\x02\x01")
        good = struct.pack(">IBB", 3, 1, 0) + b"a"
        self.assertReason(6, good + b"\x00\x00\x00")

    def test_pdv_length_below_two(self):
        self.assertReason(6, struct.pack(">IBB", 1, 1, 0))
        self.assertReason(6, struct.pack(">IBB", 0, 1, 0) + b"\x00\x00\x00\x02\x01\x00")

    def test_pdv_past_the_end(self):
        self.assertReason(6, struct.pack(">IBB", 10, 1, 0) + b"abc")
        good = struct.pack(">IBB", 3, 1, 0) + b"a"
        self.assertReason(6, good + struct.pack(">IBB", 0xFFFFFFFF, 1, 0))


def _stream_pdus():
    """A stream of mixed PDUs."""
    pdus = [
        vectors.a_associate_rq,
        vectors.a_associate_ac,
        vectors.a_associate_rq_user_id_ext_neg,
        vectors.p_data_tf,
        encode_p_data_tf([(1, 0, bytes(range(256)) * 300)]),
        encode_p_data_tf([(1, 0, b"")]),
        vectors.p_data_tf_n_event_report,
        encode_p_data_tf([(3, 1, b"a" * 5), (3, 3, b"b" * 7)]),
        vectors.a_associate_rj,
        vectors.a_release_rq,
        vectors.a_release_rp,
        vectors.a_abort,
        vectors.a_p_abort,
        _fixed_length(vectors.a_associate_ac_user),
        vectors.a_associate_ac_zero_ts,
        encode_p_data_tf([(5, 2, b"\xff" * 70000)]),
    ]
    return pdus


def _expected(pdus):
    return [(p[0], p[6:]) for p in pdus]


def _feed_chunks(framer, data, sizes):
    out = []
    offset = 0
    for size in sizes:
        out.extend(framer.feed(data[offset : offset + size]))
        offset += size
    out.extend(framer.feed(data[offset:]))
    return [(t, bytes(b)) for t, b in out]


class FramerTests(SynchronousTestCase):
    def setUp(self):
        self.pdus = _stream_pdus()
        self.stream = b"".join(self.pdus)

    def test_all_at_once(self):
        framer = PDUFramer()
        self.assertEqual([(t, bytes(b)) for t, b in framer.feed(self.stream)], _expected(self.pdus))
        self.assertEqual(framer.buffered, 0)

    def test_byte_at_a_time(self):
        framer = PDUFramer()
        out = []
        for i in range(len(self.stream)):
            got = framer.feed(self.stream[i : i + 1])
            out.extend((t, bytes(b)) for t, b in got)
        self.assertEqual(out, _expected(self.pdus))
        self.assertEqual(framer.buffered, 0)

    def test_random_chunkings(self):
        rng = random.Random(20240603)
        expected = _expected(self.pdus)
        for _ in range(60):
            sizes = []
            total = 0
            while total < len(self.stream):
                size = rng.choice((1, 2, 5, 6, 7, rng.randint(1, 300), rng.randint(1, 70000)))
                sizes.append(size)
                total += size
            self.assertEqual(_feed_chunks(PDUFramer(), self.stream, sizes), expected)

    def test_split_at_every_offset(self):
        data = b"".join(self.pdus[:4] + self.pdus[6:14])
        expected = _expected(self.pdus[:4] + self.pdus[6:14])
        for cut in range(len(data) + 1):
            self.assertEqual(_feed_chunks(PDUFramer(), data, [cut]), expected)

    def test_results_decode(self):
        framer = PDUFramer()
        decoded = [decode_pdu(t, b) for t, b in framer.feed(self.stream)]
        self.assertEqual([type(d) for d in decoded[:4]], [AssociateRQ, AssociateAC, AssociateRQ, PDataTF])
        self.assertEqual(decoded[8:13], [AssociateRJ(1, 1, 1), ReleaseRQ(), ReleaseRP(), Abort(0, 0), Abort(2, 4)])

    def test_whole_pdus_are_views_of_the_chunk(self):
        """
        PDUs that arrive whole are not copied; a PDU assembled across
        chunks is handed over without a second copy.
        """
        framer = PDUFramer()
        chunk = vectors.p_data_tf + vectors.a_release_rq[:3]
        ((pdu_type, body),) = framer.feed(chunk)
        self.assertEqual(pdu_type, P_DATA_TF)
        self.assertIsInstance(body, memoryview)
        self.assertIs(body.obj, chunk)
        self.assertEqual(framer.buffered, 3)
        ((pdu_type, body),) = framer.feed(vectors.a_release_rq[3:])
        self.assertEqual((pdu_type, bytes(body)), (A_RELEASE_RQ, b"\x00" * 4))
        self.assertIsInstance(body.obj, bytearray)
        self.assertEqual(framer.buffered, 0)

    def test_later_feeds_do_not_disturb_earlier_results(self):
        framer = PDUFramer()
        first = framer.feed(vectors.a_release_rq[:7])
        self.assertEqual(first, [])
        got = framer.feed(vectors.a_release_rq[7:] + vectors.a_abort[:5])
        body = got[0][1]
        framer.feed(vectors.a_abort[5:] + vectors.p_data_tf)
        self.assertEqual(bytes(body), b"\x00" * 4)

    def test_accepts_bytearray_and_memoryview(self):
        framer = PDUFramer()
        data = bytearray(vectors.a_abort)
        got = framer.feed(data)
        data[:] = b"\xff" * len(data)
        self.assertEqual([(t, bytes(b)) for t, b in got], [(A_ABORT, b"\x00\x00\x00\x00")])
        got = framer.feed(memoryview(vectors.a_release_rp))
        self.assertEqual([(t, bytes(b)) for t, b in got], [(A_RELEASE_RP, b"\x00\x00\x00\x00")])

    def test_empty_feed(self):
        framer = PDUFramer()
        self.assertEqual(framer.feed(b""), [])
        framer.feed(vectors.a_abort[:8])
        self.assertEqual(framer.feed(b""), [])
        self.assertEqual(len(framer.feed(vectors.a_abort[8:])), 1)


class FramerLimitTests(SynchronousTestCase):
    def test_oversize_p_data_rejected_from_the_header(self):
        framer = PDUFramer(max_pdu_length=16384)
        header = struct.pack(">BxI", P_DATA_TF, 16385)
        self.assertEqual(framer.feed(header[:5]), [])
        e = self.assertRaises(PDUError, framer.feed, header[5:])
        self.assertEqual(e.reason, 6)
        self.assertEqual(framer.buffered, 6)

    def test_huge_p_data_rejected_before_the_body(self):
        framer = PDUFramer()
        e = self.assertRaises(PDUError, framer.feed, struct.pack(">BxI", P_DATA_TF, 0xFFFFFFFF))
        self.assertEqual(e.reason, 6)

    def test_oversize_in_the_middle_of_a_chunk(self):
        framer = PDUFramer(max_pdu_length=100)
        data = vectors.p_data_tf + struct.pack(">BxI", P_DATA_TF, 101) + b"x" * 101
        e = self.assertRaises(PDUError, framer.feed, data)
        self.assertEqual(e.reason, 6)
        self.assertEqual([(t, bytes(b)) for t, b in e.pdus], [(P_DATA_TF, vectors.p_data_tf[6:])])

    def test_limit_is_inclusive(self):
        framer = PDUFramer(max_pdu_length=90)
        pdu_bytes = encode_p_data_tf([(1, 0, b"a" * 84)])
        self.assertEqual(len(pdu_bytes) - 6, 90)
        self.assertEqual(len(framer.feed(pdu_bytes)), 1)

    def test_zero_means_unlimited(self):
        framer = PDUFramer(max_pdu_length=0)
        self.assertEqual(framer.feed(struct.pack(">BxI", P_DATA_TF, 0xFFFFFFFF)), [])
        self.assertEqual(framer.buffered, 6)

    def test_associate_limit(self):
        framer = PDUFramer(max_pdu_length=0, max_associate_length=100)
        e = self.assertRaises(PDUError, framer.feed, vectors.a_associate_rq[:6])
        self.assertEqual(e.reason, 6)
        framer = PDUFramer(max_associate_length=len(vectors.a_associate_rq) - 6)
        self.assertEqual(len(framer.feed(vectors.a_associate_rq)), 1)

    def test_fixed_length_pdus(self):
        for pdu_type in (A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
            for length in (0, 3, 5, 1000):
                e = self.assertRaises(PDUError, PDUFramer().feed, struct.pack(">BxI", pdu_type, length))
                self.assertEqual(e.reason, 6)

    def test_unknown_pdu_type(self):
        for pdu_type in (0x00, 0x08, 0x10, 0x59, 0xFF):
            framer = PDUFramer()
            e = self.assertRaises(PDUError, framer.feed, struct.pack(">BxI", pdu_type, 4))
            self.assertEqual(e.reason, 1)

    def test_garbage(self):
        e = self.assertRaises(PDUError, PDUFramer().feed, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(e.reason, 1)

    def test_unknown_type_after_valid_pdus(self):
        framer = PDUFramer()
        data = vectors.a_release_rq + vectors.a_abort + b"\x09\x00\x00\x00\x00\x00"
        e = self.assertRaises(PDUError, framer.feed, data)
        self.assertEqual(e.reason, 1)
        self.assertEqual([t for t, _ in e.pdus], [A_RELEASE_RQ, A_ABORT])

    def test_errors_are_sticky(self):
        framer = PDUFramer()
        first = self.assertRaises(PDUError, framer.feed, b"\x08\x00\x00\x00\x00\x04")
        second = self.assertRaises(PDUError, framer.feed, vectors.a_abort)
        self.assertIs(first, second)

    def test_pynetdicom_vector_with_wrong_length(self):
        """
        Framed by its length field, a_associate_ac_user ends inside its User
        Information item: decoding it is an invalid PDU parameter, and the
        bytes left over start with an unknown PDU type.
        """
        framer = PDUFramer()
        e = self.assertRaises(PDUError, framer.feed, vectors.a_associate_ac_user)
        self.assertEqual(e.reason, 1)
        ((pdu_type, body),) = e.pdus
        self.assertEqual(pdu_type, A_ASSOCIATE_AC)
        self.assertEqual(self.assertRaises(PDUError, decode_pdu, pdu_type, body).reason, 6)


class MalformedAssociateTests(SynchronousTestCase):
    def assertReason(self, reason, body, pdu_type=A_ASSOCIATE_RQ):
        e = self.assertRaises(PDUError, decode_pdu, pdu_type, body)
        self.assertEqual(e.reason, reason, str(e))
        return e

    def test_valid_handmade_request(self):
        rq = decode_pdu(A_ASSOCIATE_RQ, _rq_body([APP_CONTEXT, _context_rq(), _user_info()]))
        self.assertEqual(rq.contexts, [PresentationContextRQ(1, VERIFICATION, [IMPLICIT])])
        self.assertIsNone(rq.implementation_version_name)

    def test_too_short(self):
        self.assertReason(6, b"\x00\x01" + b"\x00" * 60)
        self.assertReason(6, b"", A_ASSOCIATE_AC)

    def test_no_presentation_context(self):
        self.assertReason(6, _rq_body([APP_CONTEXT, _user_info()]))

    def test_no_application_context(self):
        self.assertReason(6, _rq_body([_context_rq(), _user_info()]))

    def test_no_user_information(self):
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq()]))

    def test_no_maximum_length(self):
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(CLASS_UID)]))

    def test_no_implementation_class_uid(self):
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH)]))

    def test_item_length_past_the_end(self):
        body = _rq_body([APP_CONTEXT, _context_rq(), _user_info()])
        self.assertReason(6, body[:-1])
        self.assertReason(6, body + b"\x10\x00")
        self.assertReason(6, body + b"\x10\x00\x00\x05abc")

    def test_sub_item_length_past_its_item(self):
        bad = _item(0x20, b"\x01\x00\x00\x00" + b"\x30\x00\x00\x40" + VERIFICATION.encode())
        self.assertReason(6, _rq_body([APP_CONTEXT, bad, _user_info()]))
        bad = _item(0x50, MAX_LENGTH + b"\x52\x00\x00\xff" + PYN_CLASS_UID.encode())
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), bad]))

    def test_context_without_abstract_or_transfer_syntax(self):
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(subs=[_item(0x40, IMPLICIT.encode())]), _user_info()]))
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(subs=[_item(0x30, CT.encode())]), _user_info()]))
        two = [_item(0x30, CT.encode()), _item(0x30, MR.encode()), _item(0x40, IMPLICIT.encode())]
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(subs=two), _user_info()]))

    def test_context_ids(self):
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(2), _user_info()]))
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(1), _context_rq(1), _user_info()]))
        self.assertReason(6, _rq_body([APP_CONTEXT, _item(0x20, b"\x01\x00"), _user_info()]))

    def test_non_ascii_abstract_syntax(self):
        ctx = vectors.presentation_context_rq_utf8.replace(b"\x4d\x00\xff\x00", b"\x01\x00\x00\x00")
        self.assertReason(6, _rq_body([APP_CONTEXT, ctx, _user_info()]))

    def test_uids_read_as_pynetdicom_reads_them(self):
        """
        Conformant UIDs are read directly; any other goes through
        pynetdicom's item class: the result (or the refusal) is the same.
        """
        uids = [
            b"1.2.840.10008.1.2", b"1.2.840.10008.1.2\x00", b"0", b"1.0.3", b"1." * 31 + b"12",
            b"1.02.3", b"1.2.", b".1.2", b"1..2", b"1.2 ", b"1.2\x00\x00", b"a.b", b"1.2.3x", b"",
            b"1." * 32 + b"1",
        ]
        for raw in uids:
            body = _rq_body([APP_CONTEXT, _context_rq(subs=[_item(0x30, raw), _item(0x40, IMPLICIT.encode())]),
                             _user_info()])
            expected = pyn_items.AbstractSyntaxSubItem()
            try:
                expected.decode(_item(0x30, raw))
            except (ValueError, TypeError):
                expected = None
            if expected is None or not expected.abstract_syntax_name:
                self.assertRaises(PDUError, decode_pdu, A_ASSOCIATE_RQ, body)
                continue
            rq = decode_pdu(A_ASSOCIATE_RQ, body)
            self.assertEqual(rq.contexts[0].abstract_syntax, str(expected.abstract_syntax_name), raw)
            self.assertIs(type(rq.contexts[0].abstract_syntax), str)

    def test_uid_too_long(self):
        ctx = _context_rq(subs=[_item(0x30, b"1." * 40 + b"1"), _item(0x40, IMPLICIT.encode())])
        self.assertReason(6, _rq_body([APP_CONTEXT, ctx, _user_info()]))

    def test_items_in_the_wrong_pdu(self):
        ac_context = _item(0x21, b"\x01\x00\x00\x00" + _item(0x40, IMPLICIT.encode()))
        self.assertReason(5, _rq_body([APP_CONTEXT, _context_rq(), ac_context, _user_info()]))
        self.assertReason(5, _rq_body([APP_CONTEXT, _context_rq(), _item(0x30, CT.encode()), _user_info()]))
        identity_ac = _item(0x59, b"\x00\x02ok")
        self.assertReason(5, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, identity_ac)]))
        self.assertReason(5, _ac_body([_context_rq()]), A_ASSOCIATE_AC)

    def test_repeated_items(self):
        self.assertReason(5, _rq_body([APP_CONTEXT, APP_CONTEXT, _context_rq(), _user_info()]))
        self.assertReason(5, _rq_body([APP_CONTEXT, _context_rq(), _user_info(), _user_info()]))
        self.assertReason(5, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, MAX_LENGTH, CLASS_UID)]))

    def test_unknown_items_skipped_and_sub_items_kept(self):
        unknown_sub = _item(0x5F, b"future")
        rq = decode_pdu(
            A_ASSOCIATE_RQ,
            _rq_body([APP_CONTEXT, _item(0x11, b"?"), _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, unknown_sub)]),
        )
        self.assertEqual(rq.extended_negotiation, [unknown_sub])
        ctx = _context_rq(subs=[_item(0x30, CT.encode()), _item(0x3F, b""), _item(0x40, IMPLICIT.encode())])
        rq = decode_pdu(A_ASSOCIATE_RQ, _rq_body([APP_CONTEXT, ctx, _user_info()]))
        self.assertEqual(rq.contexts, [PresentationContextRQ(1, CT, [IMPLICIT])])

    def test_bad_maximum_length_and_async_ops(self):
        bad = _item(0x51, b"\x00\x00\x40")
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(bad, CLASS_UID)]))
        bad = _item(0x53, b"\x00\x01\x00")
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, bad)]))

    def test_bad_role_selection(self):
        uid = CT.encode()
        wrong_uid_length = _item(0x54, struct.pack(">H", len(uid) + 1) + uid + b"\x00\x01")
        self.assertReason(
            6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, wrong_uid_length)])
        )
        no_uid = _item(0x54, b"\x00\x00\x00\x01")
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, no_uid)]))
        bad_role = _item(0x54, struct.pack(">H", len(uid)) + uid + b"\x02\x01")
        self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, bad_role)]))
        odd = vectors.role_selection_odd
        rq = decode_pdu(A_ASSOCIATE_RQ, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, odd)]))
        self.assertEqual(rq.roles, [RoleSelection(CT, False, True)])

    def test_bad_user_identity(self):
        for value in (
            b"\x01\x00\x00",  # too short
            b"\x01\x00\x00\x05abc\x00\x00",  # primary runs past the item
            b"\x01\x00\x00\x03abc\x00\x05xy",  # secondary length disagrees
            b"\x01\x00\x00\x03abc\x00\x00extra",  # bytes left over
        ):
            bad = _item(0x58, value)
            self.assertReason(6, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, bad)]))
        bad = _item(0x59, b"\x00\x05ok")
        self.assertReason(6, _ac_body([], _user_info(MAX_LENGTH, CLASS_UID, bad)), A_ASSOCIATE_AC)

    def test_bad_accept_contexts(self):
        ts = _item(0x40, IMPLICIT.encode())
        accepted_without_ts = _item(0x21, b"\x01\x00\x00\x00")
        self.assertReason(6, _ac_body([accepted_without_ts]), A_ASSOCIATE_AC)
        accepted_empty_ts = _item(0x21, b"\x01\x00\x00\x00" + _item(0x40, b""))
        self.assertReason(6, _ac_body([accepted_empty_ts]), A_ASSOCIATE_AC)
        two_ts = _item(0x21, b"\x01\x00\x00\x00" + ts + ts)
        self.assertReason(6, _ac_body([two_ts]), A_ASSOCIATE_AC)
        bad_result = _item(0x21, b"\x01\x00\x05\x00" + ts)
        self.assertReason(6, _ac_body([bad_result]), A_ASSOCIATE_AC)
        self.assertReason(6, _ac_body([]), A_ASSOCIATE_AC)

    def test_rejected_context_transfer_syntax_not_tested(self):
        garbage = _item(0x21, b"\x01\x00\x03\x00" + _item(0x40, b"\xff\xfe"))
        ac = decode_pdu(A_ASSOCIATE_AC, _ac_body([garbage]))
        self.assertEqual(ac.contexts, [PresentationContextAC(1, 3, None)])
        echoed = _item(0x21, b"\x03\x00\x04\x00" + _item(0x40, BIG.encode()))
        ac = decode_pdu(A_ASSOCIATE_AC, _ac_body([echoed]))
        self.assertEqual(ac.contexts, [PresentationContextAC(3, 4, BIG)])

    def test_lenient_version_name(self):
        name = _item(0x55, b"MYSCU_1.0\x00")
        rq = decode_pdu(A_ASSOCIATE_RQ, _rq_body([APP_CONTEXT, _context_rq(), _user_info(MAX_LENGTH, CLASS_UID, name)]))
        self.assertEqual(rq.implementation_version_name, "MYSCU_1.0")

    def test_fixed_pdus_with_wrong_length(self):
        for pdu_type in (A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
            self.assertReason(6, b"\x00\x00\x00", pdu_type)
            self.assertReason(6, b"\x00\x00\x00\x00\x00", pdu_type)

    def test_unknown_pdu_type(self):
        self.assertReason(1, b"\x00\x00\x00\x00", 0x08)
        self.assertReason(1, b"\x00\x00\x00\x00", 0)


class AETitleTests(SynchronousTestCase):
    def _rq(self, called="ANY-SCP", calling="ECHOSCU"):
        return AssociateRQ(
            called_aet=called,
            calling_aet=calling,
            contexts=[PresentationContextRQ(1, VERIFICATION, [IMPLICIT])],
            max_pdu_length=16384,
            implementation_class_uid=PYN_CLASS_UID,
        )

    def test_invalid_titles(self):
        for title in (
            "",
            " ",
            " " * 16,
            "A" * 17,
            "BACK\\SLASH",
            "TAB\tX",
            "NUL\x00",
            "CAF\u00c9",
            "\x7f",
            b"BYTES",
            None,
        ):
            self.assertRaises(ValueError, encode_pdu, self._rq(called=title))
            self.assertRaises(ValueError, encode_pdu, self._rq(calling=title))
            ac = AssociateAC(title, "ECHOSCU", [PresentationContextAC(1, 0, IMPLICIT)], 0, PYN_CLASS_UID)
            self.assertRaises(ValueError, encode_pdu, ac)

    def test_valid_titles(self):
        for title in ("A", "A" * 16, "MY SCP", "  PADDED", "x-y_z.1@!~"):
            encoded = encode_pdu(self._rq(called=title, calling=title))
            self.assertEqual(encoded[10:26], title.ljust(16).encode())
            self.assertEqual(encoded[26:42], title.ljust(16).encode())
            decoded = _decode(encoded)
            self.assertEqual(decoded.called_aet, title.strip())
            self.assertEqual(decoded.calling_aet, title.strip())

    def test_implementation_version_name_validated(self):
        rq = self._rq()
        for name in ("", "X" * 17, "BAD\\"):
            rq.implementation_version_name = name
            self.assertRaises(ValueError, encode_pdu, rq)


def _full_rq():
    return AssociateRQ(
        called_aet="PACS",
        calling_aet="HARMONY",
        contexts=[
            PresentationContextRQ(1, VERIFICATION, [IMPLICIT]),
            PresentationContextRQ(3, CT, [EXPLICIT, IMPLICIT]),
            PresentationContextRQ(255, MR, [EXPLICIT, BIG, IMPLICIT]),
        ],
        max_pdu_length=1 << 20,
        implementation_class_uid="1.2.826.0.1.3680043.8.498.1",
        implementation_version_name="HARMONY_0_1",
        roles=[RoleSelection(CT, True, True), RoleSelection(MR, False, True)],
        user_identity=UserIdentityRQ(2, b"user", b"secret", True),
        async_ops=(0, 1),
        extended_negotiation=[vectors.extended_negotiation, vectors.common_extended_negotiation],
    )


def _full_ac():
    return AssociateAC(
        called_aet="PACS",
        calling_aet="HARMONY",
        contexts=[
            PresentationContextAC(1, 0, IMPLICIT),
            PresentationContextAC(3, 4, None),
            PresentationContextAC(5, 3, None),
            PresentationContextAC(7, 1, None),
            PresentationContextAC(255, 0, EXPLICIT),
        ],
        max_pdu_length=0,
        implementation_class_uid="1.2.826.0.1.3680043.8.498.1",
        implementation_version_name="HARMONY_0_1",
        roles=[RoleSelection(CT, False, True)],
        user_identity_response=b"\x00token\xff",
        async_ops=(1, 1),
        extended_negotiation=[vectors.extended_negotiation],
    )


class ModelRoundTripTests(SynchronousTestCase):
    def test_request(self):
        rq = _full_rq()
        encoded = encode_pdu(rq)
        self.assertEqual(encoded[0], A_ASSOCIATE_RQ)
        self.assertEqual(struct.unpack(">I", encoded[2:6])[0], len(encoded) - 6)
        self.assertEqual(_decode(encoded), rq)

    def test_accept(self):
        ac = _full_ac()
        encoded = encode_pdu(ac)
        self.assertEqual(_decode(encoded), ac)

    def test_minimal_and_empty_user_identity(self):
        rq = _full_rq()
        rq.user_identity = UserIdentityRQ(1, b"", b"", False)
        rq.roles, rq.async_ops, rq.extended_negotiation, rq.implementation_version_name = [], None, [], None
        self.assertEqual(_decode(encode_pdu(rq)), rq)
        ac = _full_ac()
        ac.user_identity_response = b""
        self.assertEqual(_decode(encode_pdu(ac)), ac)

    def test_other_pdus(self):
        for obj in (AssociateRJ(2, 3, 2), ReleaseRQ(), ReleaseRP(), Abort(2, 6), Abort(0, 0)):
            self.assertEqual(_decode(encode_pdu(obj)), obj)

    def test_request_matches_pynetdicom(self):
        """
        The request is what pynetdicom itself encodes from the equivalent
        A-ASSOCIATE primitive, and pynetdicom reads ours back.
        """
        rq = _full_rq()
        primitive = pyn_prim.A_ASSOCIATE()
        primitive.called_ae_title = rq.called_aet
        primitive.calling_ae_title = rq.calling_aet
        primitive.application_context_name = rq.application_context
        for c in rq.contexts:
            context = PresentationContext()
            context.context_id = c.id
            context.abstract_syntax = c.abstract_syntax
            context.transfer_syntax = c.transfer_syntaxes
            primitive.presentation_context_definition_list.append(context)
        info = []
        item = pyn_prim.MaximumLengthNotification()
        item.maximum_length_received = rq.max_pdu_length
        info.append(item)
        item = pyn_prim.ImplementationClassUIDNotification()
        item.implementation_class_uid = rq.implementation_class_uid
        info.append(item)
        item = pyn_prim.ImplementationVersionNameNotification()
        item.implementation_version_name = rq.implementation_version_name
        info.append(item)
        for role in rq.roles:
            item = pyn_prim.SCP_SCU_RoleSelectionNegotiation()
            item.sop_class_uid = role.abstract_syntax
            item.scu_role, item.scp_role = role.scu, role.scp
            info.append(item)
        item = pyn_prim.UserIdentityNegotiation()
        item.user_identity_type = rq.user_identity.type
        item.positive_response_requested = rq.user_identity.response_requested
        item.primary_field = rq.user_identity.primary
        item.secondary_field = rq.user_identity.secondary
        info.append(item)
        item = pyn_prim.AsynchronousOperationsWindowNegotiation()
        item.maximum_number_operations_invoked, item.maximum_number_operations_performed = rq.async_ops
        info.append(item)
        ext = pyn_items.SOPClassExtendedNegotiationSubItem()
        ext.decode(vectors.extended_negotiation)
        info.append(ext.to_primitive())
        common = pyn_items.SOPClassCommonExtendedNegotiationSubItem()
        common.decode(vectors.common_extended_negotiation)
        info.append(common.to_primitive())
        primitive.user_information = info
        self.assertEqual(encode_pdu(rq), pyn_pdu.A_ASSOCIATE_RQ(primitive).encode())

        theirs = pyn_pdu.A_ASSOCIATE_RQ()
        theirs.decode(encode_pdu(rq))
        back = theirs.to_primitive()
        self.assertEqual(back.called_ae_title, "PACS")
        self.assertEqual(
            [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in back.presentation_context_definition_list],
            [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts],
        )
        self.assertEqual(theirs.user_information.maximum_length, 1 << 20)
        self.assertEqual(theirs.user_information.user_identity.primary, b"user")
        self.assertEqual(theirs.user_information.user_identity.secondary, b"secret")
        self.assertEqual(sorted(theirs.user_information.role_selection), [CT, MR])

    def test_accept_readable_by_pynetdicom(self):
        theirs = pyn_pdu.A_ASSOCIATE_AC()
        theirs.decode(encode_pdu(_full_ac()))
        self.assertEqual(
            [(c.context_id, c.result, c.transfer_syntax) for c in theirs.presentation_context],
            [(1, 0, IMPLICIT), (3, 4, None), (5, 3, None), (7, 1, None), (255, 0, EXPLICIT)],
        )
        self.assertEqual(theirs.user_information.user_identity.response, b"\x00token\xff")
        self.assertEqual(theirs.user_information.async_ops_window.max_operations_invoked, 1)

    def test_rj_release_abort_match_pynetdicom(self):
        rj = pyn_pdu.A_ASSOCIATE_RJ()
        rj.result, rj.source, rj.reason_diagnostic = 2, 3, 2
        self.assertEqual(encode_pdu(AssociateRJ(2, 3, 2)), rj.encode())
        self.assertEqual(encode_pdu(ReleaseRQ()), pyn_pdu.A_RELEASE_RQ().encode())
        self.assertEqual(encode_pdu(ReleaseRP()), pyn_pdu.A_RELEASE_RP().encode())
        abort = pyn_pdu.A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 2, 6
        self.assertEqual(encode_pdu(Abort(2, 6)), abort.encode())


class EncodeValidationTests(SynchronousTestCase):
    def test_request_needs_contexts(self):
        rq = _full_rq()
        rq.contexts = []
        self.assertRaises(ValueError, encode_pdu, rq)

    def test_context_ids(self):
        for bad in (0, 2, 256, -1, "1"):
            rq = _full_rq()
            rq.contexts[0].id = bad
            self.assertRaises(ValueError, encode_pdu, rq)
            ac = _full_ac()
            ac.contexts[0].id = bad
            self.assertRaises(ValueError, encode_pdu, ac)

    def test_no_transfer_syntax(self):
        rq = _full_rq()
        rq.contexts[0].transfer_syntaxes = []
        self.assertRaises(ValueError, encode_pdu, rq)
        ac = _full_ac()
        ac.contexts[0].transfer_syntax = None
        self.assertRaises(ValueError, encode_pdu, ac)
        ac = _full_ac()
        ac.contexts[0].result = 9
        self.assertRaises(ValueError, encode_pdu, ac)

    def test_uids(self):
        for bad in ("", "1." * 40, "1.2.\u00e9"):
            rq = _full_rq()
            rq.contexts[1].abstract_syntax = bad
            self.assertRaises(ValueError, encode_pdu, rq)
            rq = _full_rq()
            rq.implementation_class_uid = bad
            self.assertRaises(ValueError, encode_pdu, rq)

    def test_extended_negotiation_items(self):
        for bad in (b"\x56\x00", b"\x56\x00\x00\x05abc", vectors.maximum_length_received, vectors.user_identity_ac):
            rq = _full_rq()
            rq.extended_negotiation = [bad]
            self.assertRaises(ValueError, encode_pdu, rq)

    def test_ranges(self):
        rq = _full_rq()
        rq.max_pdu_length = 1 << 32
        self.assertRaises(ValueError, encode_pdu, rq)
        rq = _full_rq()
        rq.async_ops = (1, 1 << 16)
        self.assertRaises(ValueError, encode_pdu, rq)
        rq = _full_rq()
        rq.user_identity = UserIdentityRQ(1, b"x" * 70000, b"", False)
        self.assertRaises(ValueError, encode_pdu, rq)
        self.assertRaises(ValueError, encode_pdu, AssociateRJ(1, 1, 256))
        self.assertRaises(ValueError, encode_pdu, Abort(2, 256))

    def test_not_a_pdu(self):
        self.assertRaises(TypeError, encode_pdu, object())

    def test_pdu_error(self):
        e = PDUError(6, "bad length")
        self.assertEqual((e.reason, e.message, e.pdus), (6, "bad length", []))
        self.assertIn("6", str(e))
        self.assertEqual(pdu.ABORT_REASON_INVALID_PDU_PARAMETER_VALUE, 6)
        self.assertEqual(
            (A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT),
            (1, 2, 3, 4, 5, 6, 7),
        )


class PresentationContextItemEncodingTests(SynchronousTestCase):
    """
    The struct-encoded presentation context items are byte-identical to
    pynetdicom's item objects, for every storage SOP class and the
    transfer syntaxes Harmony offers (odd and even UID lengths).
    """

    SYNTAXES = [
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
    ]

    def test_rq_items(self):
        from pynetdicom.presentation import StoragePresentationContexts

        for i, context in enumerate(StoragePresentationContexts):
            for count in (1, 3, len(self.SYNTAXES)):
                ours = pdu._presentation_context_rq(
                    pdu.PresentationContextRQ(2 * (i % 128) + 1, context.abstract_syntax, self.SYNTAXES[:count])
                ).encode()
                item = pyn_items.PresentationContextItemRQ()
                item.presentation_context_id = 2 * (i % 128) + 1
                sub = pyn_items.AbstractSyntaxSubItem()
                sub.abstract_syntax_name = context.abstract_syntax
                item.abstract_transfer_syntax_sub_items.append(sub)
                for uid in self.SYNTAXES[:count]:
                    sub = pyn_items.TransferSyntaxSubItem()
                    sub.transfer_syntax_name = uid
                    item.abstract_transfer_syntax_sub_items.append(sub)
                self.assertEqual(ours, item.encode(), context.abstract_syntax)

    def test_ac_items(self):
        for result in (0, 1, 2, 3, 4):
            for uid in self.SYNTAXES + [None]:
                if result == 0 and uid is None:
                    continue
                context = pdu.PresentationContextAC(5, result, uid)
                ours = pdu._presentation_context_ac(context).encode()
                item = pyn_items.PresentationContextItemAC()
                item.presentation_context_id = 5
                item.result_reason = result
                if uid:
                    sub = pyn_items.TransferSyntaxSubItem()
                    sub.transfer_syntax_name = uid
                    item.transfer_syntax_sub_item = [sub]
                    self.assertEqual(ours, item.encode())
                else:
                    self.assertEqual(ours, bytes((0x21, 0, 0, 8, 5, 0, result, 0)) + b"\x40\x00\x00\x00")

    def test_invalid_contexts_still_refused(self):
        with self.assertRaises(ValueError):
            pdu._presentation_context_rq(pdu.PresentationContextRQ(2, "1.2.3", ["1.2.840.10008.1.2"]))
        with self.assertRaises(ValueError):
            pdu._presentation_context_rq(pdu.PresentationContextRQ(3, "1.2.3", []))
        with self.assertRaises(ValueError):
            pdu._presentation_context_rq(pdu.PresentationContextRQ(3, "1." * 40, ["1.2.840.10008.1.2"]))
        with self.assertRaises(ValueError):
            pdu._presentation_context_ac(pdu.PresentationContextAC(3, 0, None))
        with self.assertRaises(ValueError):
            pdu._presentation_context_ac(pdu.PresentationContextAC(3, 7, "1.2.840.10008.1.2"))
