"""
Tests for L{harmony.dimse.messages}: command sets, templated responses,
PDV assembly and P-DATA-TF fragmentation, all checked byte for byte against
pynetdicom's C{DIMSEMessage} encoding and its shipped vectors.
"""

import ast
import inspect
import random
import struct
import warnings
from io import BytesIO

import pytest
from pydicom.datadict import DicomDictionary
from pynetdicom import dimse_messages as pnd_messages
from pynetdicom import dimse_primitives as pnd_primitives
from pynetdicom.dsutils import decode as pnd_decode
from pynetdicom.dsutils import encode as pnd_encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.tests import encoded_dimse_msg as vectors

from harmony.dimse import messages
from harmony.dimse.messages import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RQ,
    C_FIND_RSP,
    C_GET_RQ,
    C_GET_RSP,
    C_MOVE_RQ,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    NO_DATASET,
    Command,
    CommandError,
    DataFragment,
    MessageAssembler,
    MessageError,
    decode_command,
    echo_rsp,
    encode_command,
    fragment,
    store_rsp,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
VERIFICATION = "1.2.840.10008.1.1"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def random_uid(rng, length=None):
    """A syntactically valid UID of the given (or a random) length, 3..64."""
    if length is None:
        length = rng.randint(3, 64)
    uid = "1.2"
    while len(uid) < length:
        room = length - len(uid)
        if room == 1:
            uid = uid[:-1] + str(rng.randint(1, 9)) + str(rng.randint(0, 9))
            break
        component = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(0, 6)))
        uid += "." + component[: room - 1]
    return uid[:length]


def random_ae(rng):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))


def random_comment(rng):
    return "".join(rng.choice("abcdefghij KLMNOP-0123456789.") for _ in range(rng.randint(0, 64))).strip() or "x"


_PRIMITIVES = {
    "C_ECHO": pnd_primitives.C_ECHO,
    "C_STORE": pnd_primitives.C_STORE,
    "C_FIND": pnd_primitives.C_FIND,
    "C_GET": pnd_primitives.C_GET,
    "C_MOVE": pnd_primitives.C_MOVE,
    "C_CANCEL": pnd_primitives.C_CANCEL,
}
_DATASET_PARAMETER = {"C_STORE_RQ": "DataSet"}


def pynetdicom_message(message_type, params, dataset=None):
    """
    Build pynetdicom's DIMSE message (C{"C_STORE_RQ"}, ...) from primitive
    parameters, the way its DIMSE provider does.
    """
    primitive = _PRIMITIVES[message_type.rsplit("_", 1)[0]]()
    for name, value in params.items():
        setattr(primitive, name, value)
    if dataset is not None:
        setattr(primitive, _DATASET_PARAMETER.get(message_type, "Identifier"), BytesIO(dataset))
    message = getattr(pnd_messages, message_type)()
    message.primitive_to_message(primitive)
    return message


def pynetdicom_command(message_type, params, dataset=None):
    message = pynetdicom_message(message_type, params, dataset)
    return pnd_encode(message.command_set, True, True)


def pynetdicom_pdus(message_type, params, dataset, context_id, max_pdu_length):
    message = pynetdicom_message(message_type, params, dataset)
    out = []
    for primitive in message.encode_msg(context_id, max_pdu_length):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(pdu.encode())
    return out


def parse_pdata(pdu):
    """Our own P-DATA-TF reader: [(context_id, control_header, data)]."""
    pdu_type, _, length = struct.unpack_from(">BBI", pdu, 0)
    assert pdu_type == 0x04
    assert length == len(pdu) - 6
    pdvs = []
    offset = 6
    while offset < len(pdu):
        item_length, context_id, control_header = struct.unpack_from(">IBB", pdu, offset)
        pdvs.append((context_id, control_header, pdu[offset + 6 : offset + 4 + item_length]))
        offset += 4 + item_length
    assert offset == len(pdu)
    return pdvs


def our_fields(command_field, params, dataset=None):
    """The fields L{encode_command} gets for the same message."""
    fields = {k: v for k, v in params.items() if v is not None}
    fields["CommandField"] = command_field
    fields["CommandDataSetType"] = 0x0001 if dataset is not None else NO_DATASET
    return fields


def element_boundaries(command):
    """Offsets at which the elements of an encoded command set end."""
    offset, ends = 0, []
    while offset < len(command):
        _, _, length = struct.unpack_from("<HHI", command, offset)
        offset += 8 + length
        ends.append(offset)
    return ends


# ---------------------------------------------------------------------------
# the element table
# ---------------------------------------------------------------------------


def test_element_table_is_pydicoms_command_group():
    ours = {(0x0000 << 16) | elem: (keyword, vr) for elem, keyword, vr in messages._ELEMENTS}
    theirs = {tag: (entry[4], entry[0]) for tag, entry in DicomDictionary.items() if tag >> 16 == 0}
    assert ours == theirs


def test_module_imports_nothing_heavy():
    """
    Rule 10 and the sans-IO rule: the per-message module imports neither
    Twisted nor pydicom/pynetdicom, only the standard library's struct and
    collections.
    """
    tree = ast.parse(inspect.getsource(messages))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"struct", "collections"}


# ---------------------------------------------------------------------------
# pynetdicom's shipped vectors
# ---------------------------------------------------------------------------

VECTOR_FIELDS = {
    "c_echo_rq_cmd": {
        "CommandGroupLength": 56,
        "AffectedSOPClassUID": VERIFICATION,
        "CommandField": C_ECHO_RQ,
        "MessageID": 7,
        "CommandDataSetType": NO_DATASET,
    },
    "c_echo_rsp_cmd": {
        "CommandGroupLength": 66,
        "AffectedSOPClassUID": VERIFICATION,
        "CommandField": C_ECHO_RSP,
        "MessageIDBeingRespondedTo": 8,
        "CommandDataSetType": NO_DATASET,
        "Status": 0x0000,
    },
    "c_store_rq_cmd": {
        "CommandGroupLength": 94,
        "AffectedSOPClassUID": "1.1.1",
        "CommandField": C_STORE_RQ,
        "MessageID": 7,
        "Priority": 2,
        "CommandDataSetType": 0x0001,
        "AffectedSOPInstanceUID": "1.2.1",
        "MoveOriginatorApplicationEntityTitle": "UNITTEST",
        "MoveOriginatorMessageID": 3,
    },
    "c_store_rq_cmd_b": {
        "CommandGroupLength": 170,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_STORE_RQ,
        "MessageID": 7,
        "Priority": 2,
        "CommandDataSetType": 0x0001,
        "AffectedSOPInstanceUID": "1.2.392.200036.9116.2.6.1.48.1215709044.1459316254.522441",
        "MoveOriginatorApplicationEntityTitle": "UNITTEST_SCP",
        "MoveOriginatorMessageID": 3,
    },
    "c_store_rsp_cmd": {
        "CommandGroupLength": 76,
        "AffectedSOPClassUID": "1.2.4.10",
        "CommandField": C_STORE_RSP,
        "MessageIDBeingRespondedTo": 5,
        "CommandDataSetType": NO_DATASET,
        "Status": 0x0000,
        "AffectedSOPInstanceUID": "1.2.4.5.7.8",
    },
    "c_find_rq_cmd": {
        "CommandGroupLength": 74,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_FIND_RQ,
        "MessageID": 7,
        "Priority": 2,
        "CommandDataSetType": 0x0001,
    },
    "c_find_rsp_cmd": {
        "CommandGroupLength": 74,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_FIND_RSP,
        "MessageIDBeingRespondedTo": 5,
        "CommandDataSetType": 0x0001,
        "Status": 0xFF00,
    },
    "c_get_rq_cmd": {
        "CommandGroupLength": 74,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_GET_RQ,
        "MessageID": 7,
        "Priority": 2,
        "CommandDataSetType": 0x0001,
    },
    "c_get_rsp_cmd": {
        "CommandGroupLength": 114,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_GET_RSP,
        "MessageIDBeingRespondedTo": 5,
        "CommandDataSetType": 0x0001,
        "Status": 0xFF00,
        "NumberOfRemainingSuboperations": 3,
        "NumberOfCompletedSuboperations": 1,
        "NumberOfFailedSuboperations": 2,
        "NumberOfWarningSuboperations": 4,
    },
    "c_move_rq_cmd": {
        "CommandGroupLength": 90,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_MOVE_RQ,
        "MessageID": 7,
        "MoveDestination": "MOVE_SCP",
        "Priority": 2,
        "CommandDataSetType": 0x0001,
    },
    "c_move_rsp_cmd": {
        "CommandGroupLength": 114,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_MOVE_RSP,
        "MessageIDBeingRespondedTo": 5,
        "CommandDataSetType": 0x0001,
        "Status": 0xFF00,
        "NumberOfRemainingSuboperations": 3,
        "NumberOfCompletedSuboperations": 1,
        "NumberOfFailedSuboperations": 2,
        "NumberOfWarningSuboperations": 4,
    },
    # a non-conformant peer: VM 2 sub-operation counts and two offending elements
    "c_move_rsp_cmd_with_dup": {
        "CommandGroupLength": 114,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "CommandField": C_MOVE_RSP,
        "MessageIDBeingRespondedTo": 5,
        "CommandDataSetType": 0x0001,
        "Status": 0xFF00,
        "OffendingElement": [0x00000001, 0x00000002],
        "NumberOfRemainingSuboperations": [3, 0],
        "NumberOfCompletedSuboperations": [1, 0],
        "NumberOfFailedSuboperations": [2, 0],
        "NumberOfWarningSuboperations": [4, 0],
    },
}

DATASET_VECTORS = [
    "c_store_ds",
    "c_store_rq_ds_b",
    "c_find_rq_ds",
    "c_find_rsp_ds",
    "c_get_rq_ds",
    "c_get_rsp_ds",
    "c_move_rq_ds",
    "c_move_rsp_ds",
]


def test_every_command_vector_is_covered():
    shipped = {name for name in dir(vectors) if "_cmd" in name}
    assert shipped == set(VECTOR_FIELDS)


@pytest.mark.parametrize("name", sorted(VECTOR_FIELDS))
def test_vector_decodes_to_fields(name):
    pdv = getattr(vectors, name)
    assert pdv[0] == 0x03  # the last (and only) command fragment
    fields = decode_command(pdv[1:])
    assert fields == VECTOR_FIELDS[name]
    assert list(fields) == list(VECTOR_FIELDS[name])  # wire (tag) order


@pytest.mark.parametrize("name", sorted(VECTOR_FIELDS))
def test_vector_encodes_back_identically(name):
    pdv = getattr(vectors, name)
    expected = pdv[1:]
    if name == "c_move_rsp_cmd_with_dup":
        # this vector's Command Group Length (114) is stale: it is that of
        # c_move_rsp_cmd. decode_command returns it as sent; encode_command
        # always computes the right one.
        assert decode_command(expected)["CommandGroupLength"] == 114
        expected = expected[:8] + struct.pack("<I", len(expected) - 12) + expected[12:]
        assert len(expected) - 12 != 114
    assert encode_command(decode_command(pdv[1:])) == expected
    # a memoryview decodes the same
    assert decode_command(memoryview(pdv)[1:]) == VECTOR_FIELDS[name]


@pytest.mark.parametrize("name", sorted(VECTOR_FIELDS))
def test_vector_decodes_like_pydicom(name):
    """Every element pydicom reads has the same value in our dict."""
    pdv = getattr(vectors, name)
    ds = pnd_decode(BytesIO(pdv[1:]), True, True)
    fields = decode_command(pdv[1:])
    assert {elem.keyword for elem in ds} == set(fields)
    for elem in ds:
        value = elem.value
        if elem.VR == "AT":
            value = list(value) if elem.VM > 1 else [value]
        elif elem.VM > 1:
            value = list(value)
        assert fields[elem.keyword] == value, elem.keyword


@pytest.mark.parametrize("name", DATASET_VECTORS)
def test_dataset_vectors_pass_through_unchanged(name):
    """A data set PDV of a vector comes out of the assembler untouched."""
    pdv = getattr(vectors, name)
    assert pdv[0] == 0x02
    command = vectors.c_store_rq_cmd_b[1:]
    assembler = MessageAssembler()
    [cmd] = assembler.feed(1, 0x03, command)
    assert cmd.has_dataset
    data = memoryview(pdv)[1:]
    [event] = assembler.feed(1, pdv[0], data)
    assert event.data is data
    assert event.last


def test_store_rsp_reproduces_vector():
    assert store_rsp(5, "1.2.4.10", "1.2.4.5.7.8", 0) == vectors.c_store_rsp_cmd[1:]


def test_echo_rsp_reproduces_vector():
    assert echo_rsp(8) == vectors.c_echo_rsp_cmd[1:]
    assert echo_rsp(8, 0) == vectors.c_echo_rsp_cmd[1:]


# ---------------------------------------------------------------------------
# encode_command against pynetdicom, every C-* request and response
# ---------------------------------------------------------------------------


def _status_fields(rng, failure_statuses):
    status = rng.choice(failure_statuses)
    params = {"Status": status}
    if status != 0x0000 and rng.random() < 0.7:
        params["ErrorComment"] = random_comment(rng)
    if status != 0x0000 and rng.random() < 0.4:
        params["OffendingElement"] = [rng.choice([0x00100010, 0x00100020, 0x0020000D, 0x00080018])
                                      for _ in range(rng.randint(1, 3))]
    return params


def _suboperations(rng):
    return {
        "NumberOfRemainingSuboperations": rng.choice([None, 0, 1, 17, 65535]),
        "NumberOfCompletedSuboperations": rng.choice([None, 0, 3, 1000]),
        "NumberOfFailedSuboperations": rng.choice([None, 0, 2]),
        "NumberOfWarningSuboperations": rng.choice([None, 0, 9]),
    }


def make_case(message_type, rng):
    """(params, dataset) for one realistic message of the given type."""
    message_id = rng.choice([0, 1, 2, 255, 256, 4097, 65534, 65535, rng.randint(0, 65535)])
    dataset = rng.choice([b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", b"\x10\x00\x20\x00\x02\x00\x00\x00*\x00"])
    if message_type == "C_ECHO_RQ":
        return {"MessageID": message_id, "AffectedSOPClassUID": VERIFICATION}, None
    if message_type == "C_ECHO_RSP":
        params = {"MessageIDBeingRespondedTo": message_id, "AffectedSOPClassUID": VERIFICATION,
                  "Status": rng.choice([0x0000, 0x0122, 0xC000])}
        if params["Status"] and rng.random() < 0.5:
            params["ErrorComment"] = random_comment(rng)
        return params, None
    if message_type == "C_STORE_RQ":
        params = {"MessageID": message_id, "AffectedSOPClassUID": random_uid(rng),
                  "AffectedSOPInstanceUID": random_uid(rng), "Priority": rng.choice([0, 1, 2])}
        if rng.random() < 0.5:
            params["MoveOriginatorApplicationEntityTitle"] = random_ae(rng)
            params["MoveOriginatorMessageID"] = rng.randint(0, 65535)
        return params, dataset
    if message_type == "C_STORE_RSP":
        params = {"MessageIDBeingRespondedTo": message_id, "AffectedSOPClassUID": random_uid(rng),
                  "AffectedSOPInstanceUID": random_uid(rng)}
        params.update(_status_fields(rng, [0x0000, 0xA700, 0xA900, 0xC000, 0xB000, 0xB007, 0x0117, 0x0122]))
        return params, None
    if message_type in ("C_FIND_RQ", "C_GET_RQ", "C_MOVE_RQ"):
        sop_class = {"C_FIND_RQ": STUDY_ROOT_FIND, "C_GET_RQ": STUDY_ROOT_GET, "C_MOVE_RQ": STUDY_ROOT_MOVE}
        params = {"MessageID": message_id, "AffectedSOPClassUID": sop_class[message_type],
                  "Priority": rng.choice([0, 1, 2])}
        if message_type == "C_MOVE_RQ":
            params["MoveDestination"] = random_ae(rng)
        return params, dataset
    if message_type == "C_FIND_RSP":
        params = {"MessageIDBeingRespondedTo": message_id, "AffectedSOPClassUID": STUDY_ROOT_FIND}
        if rng.random() < 0.5:
            params["Status"] = rng.choice([0xFF00, 0xFF01])
            return params, dataset
        params.update(_status_fields(rng, [0x0000, 0xA700, 0xA900, 0xC000, 0xFE00]))
        return params, None
    if message_type in ("C_GET_RSP", "C_MOVE_RSP"):
        params = {"MessageIDBeingRespondedTo": message_id,
                  "AffectedSOPClassUID": STUDY_ROOT_GET if message_type == "C_GET_RSP" else STUDY_ROOT_MOVE}
        params.update(_suboperations(rng))
        if rng.random() < 0.4:
            params["Status"] = 0xFF00
            return params, None
        params.update(_status_fields(rng, [0x0000, 0xA701, 0xA702, 0xA900, 0xB000, 0xC000, 0xFE00]))
        return params, (dataset if rng.random() < 0.3 else None)
    if message_type == "C_CANCEL_RQ":
        return {"MessageIDBeingRespondedTo": message_id}, None
    raise AssertionError(message_type)


MESSAGE_TYPES = {
    "C_ECHO_RQ": C_ECHO_RQ,
    "C_ECHO_RSP": C_ECHO_RSP,
    "C_STORE_RQ": C_STORE_RQ,
    "C_STORE_RSP": C_STORE_RSP,
    "C_FIND_RQ": C_FIND_RQ,
    "C_FIND_RSP": C_FIND_RSP,
    "C_GET_RQ": C_GET_RQ,
    "C_GET_RSP": C_GET_RSP,
    "C_MOVE_RQ": C_MOVE_RQ,
    "C_MOVE_RSP": C_MOVE_RSP,
    "C_CANCEL_RQ": C_CANCEL_RQ,
}


def test_command_field_codes_are_pynetdicoms():
    theirs = {name.replace("-", "_"): code for code, (name, _) in pnd_messages._MESSAGE_TYPES.items()}
    for name, code in MESSAGE_TYPES.items():
        assert theirs[name] == code


@pytest.mark.parametrize("message_type", sorted(MESSAGE_TYPES))
def test_encode_command_matches_pynetdicom(message_type):
    rng = random.Random("encode-" + message_type)
    for _ in range(150):
        params, dataset = make_case(message_type, rng)
        expected = pynetdicom_command(message_type, params, dataset)
        fields = our_fields(MESSAGE_TYPES[message_type], params, dataset)
        encoded = encode_command(fields)
        assert encoded == expected, (params, dataset is not None)
        # and back
        decoded = decode_command(encoded)
        assert decoded.pop("CommandGroupLength") == len(encoded) - 12
        assert decoded == fields


def test_encode_command_odd_and_even_uid_lengths():
    rng = random.Random(7)
    for length in range(3, 65):
        params = {"MessageID": 1, "AffectedSOPClassUID": random_uid(rng, length),
                  "AffectedSOPInstanceUID": random_uid(rng, 64 - length + 3), "Priority": 0}
        assert len(params["AffectedSOPClassUID"]) == length
        fields = our_fields(C_STORE_RQ, params, b"x")
        assert encode_command(fields) == pynetdicom_command("C_STORE_RQ", params, b"x")


def test_encode_command_error_comment_text():
    """ErrorComment padding, empty comment and non-latin-1 characters as pydicom writes them."""
    for comment in ["", "a", "ab", "Out of resources", "h\xe9llo", "caf\xe9 \u20ac", "x" * 64]:
        params = {"MessageIDBeingRespondedTo": 3, "AffectedSOPClassUID": CT_IMAGE_STORAGE,
                  "AffectedSOPInstanceUID": "1.2.3.4", "Status": 0xC000, "ErrorComment": comment}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns that it replaced the euro sign with "?"
            expected = pynetdicom_command("C_STORE_RSP", params)
        assert encode_command(our_fields(C_STORE_RSP, params)) == expected, comment
        assert store_rsp(3, CT_IMAGE_STORAGE, "1.2.3.4", 0xC000, comment) == expected, comment


def test_encode_command_ae_titles_kept_as_given():
    for ae in ["A", "AB", " AB ", "STORESCP", "ABCDEFGHIJKLMNOP", "AE TITLE"]:
        params = {"MessageID": 9, "AffectedSOPClassUID": STUDY_ROOT_MOVE, "Priority": 1, "MoveDestination": ae}
        assert encode_command(our_fields(C_MOVE_RQ, params, b"q")) == pynetdicom_command("C_MOVE_RQ", params, b"q")


def test_encode_command_leaves_out_none_and_ignores_group_length():
    fields = {"CommandGroupLength": 12345, "CommandField": C_ECHO_RQ, "MessageID": 7,
              "AffectedSOPClassUID": VERIFICATION, "CommandDataSetType": NO_DATASET, "ErrorComment": None,
              "MoveDestination": None}
    assert encode_command(fields) == vectors.c_echo_rq_cmd[1:]


def test_encode_command_order_of_fields_does_not_matter():
    fields = dict(VECTOR_FIELDS["c_store_rq_cmd_b"])
    reversed_fields = dict(reversed(list(fields.items())))
    assert encode_command(reversed_fields) == vectors.c_store_rq_cmd_b[1:]


def test_encode_command_at_forms():
    base = {"CommandField": C_STORE_RSP, "CommandDataSetType": NO_DATASET}
    as_ints = encode_command(dict(base, OffendingElement=[0x00100010, 0x7FE00010]))
    assert encode_command(dict(base, OffendingElement=[(0x0010, 0x0010), (0x7FE0, 0x0010)])) == as_ints
    assert encode_command(dict(base, OffendingElement=0x00100010)) == encode_command(
        dict(base, OffendingElement=[0x00100010])
    )
    assert b"\x10\x00\x10\x00\xe0\x7f\x10\x00" in as_ints


def test_unknown_elements_round_trip_as_raw_bytes():
    command = encode_command({"CommandField": C_ECHO_RQ, "MessageID": 2, "CommandDataSetType": NO_DATASET,
                              "00000555": b"\x01\x02\x03"})
    fields = decode_command(command)
    assert fields["00000555"] == b"\x01\x02\x03"
    assert encode_command(fields) == command
    # a known element given by its tag is encoded by its VR
    assert encode_command({"00000100": C_ECHO_RQ, "00000800": NO_DATASET}) == encode_command(
        {"CommandField": C_ECHO_RQ, "CommandDataSetType": NO_DATASET}
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"MessageID": 1},  # no CommandField
        {"CommandField": 0x10000},  # US out of range
        {"CommandField": -1},
        {"CommandField": 1, "NoSuchKeyword": 1},
        {"CommandField": 1, "00080018": b"12"},  # not group 0000
        {"CommandField": 1, "MessageID": "seven"},
        {"CommandField": 1, "AffectedSOPClassUID": 12},
        {"CommandField": 1, "00000100": 1},  # the same element twice
        {"CommandField": 1, "OffendingElement": [0x1FFFFFFFF]},
    ],
)
def test_encode_command_rejects(fields):
    with pytest.raises(CommandError):
        encode_command(fields)


# ---------------------------------------------------------------------------
# decode_command rejects malformed input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VECTOR_FIELDS))
def test_decode_truncated_vectors(name):
    command = getattr(vectors, name)[1:]
    ends = set(element_boundaries(command))
    command_field_end = element_boundaries(command)[
        [struct.unpack_from("<H", command, off + 2)[0] for off in [0] + element_boundaries(command)[:-1]].index(0x0100)
    ]
    for length in range(len(command)):
        prefix = command[:length]
        if length in ends and length >= command_field_end:
            decode_command(prefix)  # a shorter but well-formed command set
        else:
            with pytest.raises(CommandError):
                decode_command(prefix)


def test_decode_length_past_the_end():
    command = bytearray(vectors.c_echo_rq_cmd[1:])
    struct.pack_into("<I", command, 16, 1000)  # AffectedSOPClassUID's length
    with pytest.raises(CommandError, match="past the end"):
        decode_command(bytes(command))
    struct.pack_into("<I", command, 16, 0xFFFFFFFF)  # undefined length
    with pytest.raises(CommandError):
        decode_command(bytes(command))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x00\x00\x00\x00\x04\x00\x00",
        # group length only: no CommandField
        b"\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00",
        # an element outside group 0000
        b"\x08\x00\x18\x00\x02\x00\x00\x001\x00" + b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00",
        # CommandField of 3 bytes
        b"\x00\x00\x00\x01\x03\x00\x00\x00\x30\x00\x00",
        # CommandField with two values
        b"\x00\x00\x00\x01\x04\x00\x00\x00\x30\x00\x30\x00",
        # MessageID with no value
        b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00" + b"\x00\x00\x10\x01\x00\x00\x00\x00",
        # OffendingElement of 6 bytes
        b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00" + b"\x00\x00\x01\x09\x06\x00\x00\x00\x10\x00\x10\x00\x20\x00",
        # group length of 2 bytes
        b"\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00",
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        b"\xff" * 64,
    ],
)
def test_decode_rejects_garbage(data):
    with pytest.raises(CommandError):
        decode_command(data)


def test_decode_random_garbage_only_raises_command_error():
    rng = random.Random(3)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        with pytest.raises(CommandError):
            decode_command(data)


def test_decode_mutated_vectors_decode_or_raise_command_error():
    """Bit flips in real command sets give a dict or CommandError, nothing else."""
    rng = random.Random(4)
    names = sorted(VECTOR_FIELDS)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        command = bytearray(getattr(vectors, rng.choice(names))[1:])
        for _ in range(rng.randint(1, 3)):
            command[rng.randrange(len(command))] ^= 1 << rng.randrange(8)
        try:
            fields = decode_command(bytes(command))
        except CommandError:
            outcomes["error"] += 1
        else:
            assert "CommandField" in fields
            outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["error"]


def test_command_error_is_a_message_error_and_value_error():
    assert issubclass(CommandError, MessageError)
    assert issubclass(MessageError, ValueError)


def test_decode_text_padding():
    command = encode_command({
        "CommandField": C_MOVE_RQ, "CommandDataSetType": 1, "MoveDestination": " DEST",
        "AffectedSOPClassUID": "1.2.3", "ErrorComment": "abc", "00000555": b"x",
    })
    fields = decode_command(command)
    assert fields["MoveDestination"] == "DEST"  # AE: spaces are not significant
    assert fields["AffectedSOPClassUID"] == "1.2.3"  # NUL padding gone
    assert fields["ErrorComment"] == "abc"
    # a UID padded with a space by a sloppy peer
    sloppy = command.replace(b"1.2.3\x00", b"1.2.3 ")
    assert decode_command(sloppy)["AffectedSOPClassUID"] == "1.2.3"


# ---------------------------------------------------------------------------
# store_rsp / echo_rsp templates
# ---------------------------------------------------------------------------


def store_rsp_fields(message_id, sop_class_uid, sop_instance_uid, status, error_comment=None):
    return {
        "AffectedSOPClassUID": sop_class_uid,
        "CommandField": C_STORE_RSP,
        "MessageIDBeingRespondedTo": message_id,
        "CommandDataSetType": NO_DATASET,
        "Status": status,
        "ErrorComment": error_comment,
        "AffectedSOPInstanceUID": sop_instance_uid,
    }


def test_store_rsp_matches_encode_command():
    rng = random.Random(11)
    classes = [random_uid(rng, n) for n in (3, 4, 25, 26, 63, 64)] + [CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.7"]
    for _ in range(3000):
        args = (
            rng.choice([0, 1, 2, 65534, 65535, rng.randint(0, 65535)]),
            rng.choice(classes),
            random_uid(rng),
            rng.choice([0x0000, 0xA700, 0xA900, 0xB000, 0xB006, 0xB007, 0xC000, 0xC211, 0x0122]),
            rng.choice([None, None, "", "x", "Cannot understand", random_comment(rng)]),
        )
        assert store_rsp(*args) == encode_command(store_rsp_fields(*args)), args


def test_store_rsp_matches_pynetdicom():
    rng = random.Random(12)
    for _ in range(200):
        message_id, status = rng.choice([0, 1, 65535, rng.randint(0, 65535)]), rng.choice([0, 0xA700, 0xC000])
        sop_class, sop_instance = random_uid(rng), random_uid(rng)
        comment = random_comment(rng) if status and rng.random() < 0.5 else None
        params = {"MessageIDBeingRespondedTo": message_id, "AffectedSOPClassUID": sop_class,
                  "AffectedSOPInstanceUID": sop_instance, "Status": status, "ErrorComment": comment}
        assert store_rsp(message_id, sop_class, sop_instance, status, comment) == pynetdicom_command(
            "C_STORE_RSP", params
        )


def test_store_rsp_template_cache_is_bounded():
    rng = random.Random(13)
    for i in range(1200):
        sop_class = "1.2.3.%d" % i
        instance = random_uid(rng)
        assert store_rsp(i, sop_class, instance, 0) == encode_command(store_rsp_fields(i, sop_class, instance, 0))
        assert len(messages._STORE_RSP_TEMPLATES) <= messages._STORE_RSP_TEMPLATES_MAX


@pytest.mark.parametrize(
    "args",
    [
        (65536, CT_IMAGE_STORAGE, "1.2", 0),
        (-1, CT_IMAGE_STORAGE, "1.2", 0),
        (1, CT_IMAGE_STORAGE, "1.2", 0x10000),
        (1, CT_IMAGE_STORAGE, "1.2\u20ac", 0),
        (1, "1.2\u20ac", "1.2", 0),
        (1, CT_IMAGE_STORAGE, None, 0),
    ],
)
def test_store_rsp_rejects(args):
    with pytest.raises(CommandError):
        store_rsp(*args)


def test_echo_rsp_matches_encode_command_and_pynetdicom():
    for message_id in [0, 1, 2, 255, 256, 4660, 65534, 65535]:
        for status in [0x0000, 0x0122, 0x0211, 0xC000, 0xFFFF]:
            fields = {"AffectedSOPClassUID": VERIFICATION, "CommandField": C_ECHO_RSP,
                      "MessageIDBeingRespondedTo": message_id, "CommandDataSetType": NO_DATASET, "Status": status}
            expected = encode_command(fields)
            assert echo_rsp(message_id, status) == expected
            assert expected == pynetdicom_command(
                "C_ECHO_RSP", {"MessageIDBeingRespondedTo": message_id, "AffectedSOPClassUID": VERIFICATION,
                               "Status": status}
            )
    assert echo_rsp(7) == echo_rsp(7, 0)
    with pytest.raises(CommandError):
        echo_rsp(65536)
    with pytest.raises(CommandError):
        echo_rsp(1, -1)


# ---------------------------------------------------------------------------
# MessageAssembler
# ---------------------------------------------------------------------------

STORE_COMMAND = vectors.c_store_rq_cmd_b[1:]
ECHO_COMMAND = vectors.c_echo_rq_cmd[1:]


def pdvs_of(pdus):
    return [pdv for pdu in pdus for pdv in parse_pdata(pdu)]


def feed_all(assembler, pdvs):
    events = []
    for pdv in pdvs:
        events.extend(assembler.feed(*pdv))
    return events


@pytest.mark.parametrize("max_pdu_length", [0, 7, 8, 13, 64, 257, 4096, 16382])
def test_assembler_reassembles_fragments(max_pdu_length):
    dataset = bytes(random.Random(max_pdu_length).randrange(256) for _ in range(20000))
    pdvs = pdvs_of(fragment(5, STORE_COMMAND, dataset, max_pdu_length))
    assembler = MessageAssembler()
    events = []
    for i, pdv in enumerate(pdvs):
        new = assembler.feed(*pdv)
        events.extend(new)
        # the Command arrives exactly with the last command fragment
        if pdv[1] & 1:
            assert bool(new) == bool(pdv[1] & 2)
        else:
            [event] = new
            assert event.data is pdv[2]  # passed on, not copied
        assert assembler.in_progress == (i < len(pdvs) - 1)
    command, fragments = events[0], events[1:]
    assert command == Command(5, VECTOR_FIELDS["c_store_rq_cmd_b"], True)
    assert command.command_field == C_STORE_RQ
    assert all(isinstance(f, DataFragment) and f.context_id == 5 for f in fragments)
    assert [f.last for f in fragments] == [False] * (len(fragments) - 1) + [True]
    assert b"".join(bytes(f.data) for f in fragments) == dataset


def test_assembler_byte_at_a_time():
    dataset = b"\x10\x00\x10\x00\x04\x00\x00\x00Doe^" * 50
    assembler = MessageAssembler()
    events = []
    for i in range(len(STORE_COMMAND)):
        last = i == len(STORE_COMMAND) - 1
        events += assembler.feed(3, 0x03 if last else 0x01, STORE_COMMAND[i : i + 1])
        assert len(events) == (1 if last else 0)
    for i in range(len(dataset)):
        last = i == len(dataset) - 1
        [event] = assembler.feed(3, 0x02 if last else 0x00, dataset[i : i + 1])
        assert event.last == last
        events.append(event)
    assert events[0].fields == VECTOR_FIELDS["c_store_rq_cmd_b"]
    assert b"".join(e.data for e in events[1:]) == dataset
    assert not assembler.in_progress


def test_assembler_uneven_fragments_and_memoryviews():
    rng = random.Random(21)
    dataset = bytes(rng.randrange(256) for _ in range(5000))
    buffer = memoryview(b"??" + STORE_COMMAND + dataset)
    assembler = MessageAssembler()
    offset, events = 2, []
    cmd_end = 2 + len(STORE_COMMAND)
    while offset < cmd_end:
        step = min(rng.randint(1, 40), cmd_end - offset)
        events += assembler.feed(9, 0x03 if offset + step == cmd_end else 0x01, buffer[offset : offset + step])
        offset += step
    while offset < len(buffer):
        step = min(rng.randint(0, 700), len(buffer) - offset)
        piece = buffer[offset : offset + step]
        [event] = assembler.feed(9, 0x02 if offset + step == len(buffer) else 0x00, piece)
        assert event.data is piece
        events.append(event)
        offset += step
    assert events[0].fields == VECTOR_FIELDS["c_store_rq_cmd_b"]
    assert b"".join(bytes(e.data) for e in events[1:]) == dataset


def test_assembler_several_messages_and_contexts():
    assembler = MessageAssembler()
    events = []
    events += assembler.feed(1, 0x03, ECHO_COMMAND)
    assert not assembler.in_progress
    events += assembler.feed(3, 0x03, STORE_COMMAND)
    assert assembler.in_progress
    events += assembler.feed(3, 0x00, b"ab")
    events += assembler.feed(3, 0x02, b"cd")
    events += assembler.feed(5, 0x03, vectors.c_find_rq_cmd[1:])
    events += assembler.feed(5, 0x02, vectors.c_find_rq_ds[1:])
    events += assembler.feed(1, 0x03, echo_rsp(1))
    assert [type(e).__name__ for e in events] == [
        "Command", "Command", "DataFragment", "DataFragment", "Command", "DataFragment", "Command",
    ]
    assert events[0] == Command(1, VECTOR_FIELDS["c_echo_rq_cmd"], False)
    assert events[1].has_dataset and events[1].context_id == 3
    assert events[3] == DataFragment(3, b"cd", True)
    assert events[4].command_field == C_FIND_RQ
    assert events[6].fields["MessageIDBeingRespondedTo"] == 1
    assert not assembler.in_progress


def test_assembler_ignores_reserved_control_header_bits():
    assembler = MessageAssembler()
    [command] = assembler.feed(1, 0xFF, STORE_COMMAND)  # bits 2-7 set: still "last command fragment"
    assert command.has_dataset
    [event] = assembler.feed(1, 0xFE, b"xy")  # still "last data set fragment"
    assert event.last


def test_assembler_any_data_set_type_but_0101_announces_a_data_set():
    for data_set_type, has in [(0x0000, True), (0x0001, True), (0xFEFE, True), (0x0102, True), (0x0101, False)]:
        command = encode_command({"CommandField": C_FIND_RQ, "MessageID": 1, "CommandDataSetType": data_set_type})
        [event] = MessageAssembler().feed(1, 0x03, command)
        assert event.has_dataset is has


def _assembler_after(*pdvs):
    assembler = MessageAssembler()
    for pdv in pdvs:
        assembler.feed(*pdv)
    return assembler


@pytest.mark.parametrize(
    "before, bad, match",
    [
        # data set fragment with no command at all
        ([], (1, 0x02, b"x"), "without a command"),
        ([], (1, 0x00, b"x"), "without a command"),
        # data set fragment after a command that announced none
        ([(1, 0x03, ECHO_COMMAND)], (1, 0x02, b"x"), "without a command"),
        # data set fragment before the command is complete
        ([(1, 0x01, STORE_COMMAND[:20])], (1, 0x02, b"x"), "before the last command fragment"),
        # command fragment on another context while a command is being collected
        ([(1, 0x01, STORE_COMMAND[:20])], (3, 0x03, STORE_COMMAND[20:]), "context 3"),
        # data set on another context than its command
        ([(1, 0x03, STORE_COMMAND)], (3, 0x02, b"x"), "context 3"),
        ([(1, 0x03, STORE_COMMAND), (1, 0x00, b"a")], (3, 0x00, b"x"), "context 3"),
        # a new command while the data set of the previous one is incomplete
        ([(1, 0x03, STORE_COMMAND)], (1, 0x03, ECHO_COMMAND), "data set is incomplete"),
        ([(1, 0x03, STORE_COMMAND), (1, 0x00, b"a")], (1, 0x01, ECHO_COMMAND[:5]), "data set is incomplete"),
        ([(1, 0x03, STORE_COMMAND), (1, 0x00, b"a")], (3, 0x03, ECHO_COMMAND), "data set is incomplete"),
    ],
)
def test_assembler_protocol_errors(before, bad, match):
    assembler = _assembler_after(*before)
    with pytest.raises(MessageError, match=match):
        assembler.feed(*bad)


def test_assembler_malformed_command_sets():
    with pytest.raises(CommandError):
        MessageAssembler().feed(1, 0x03, STORE_COMMAND[:-3])
    with pytest.raises(CommandError):
        MessageAssembler().feed(1, 0x03, b"")
    no_data_set_type = encode_command({"CommandField": C_ECHO_RQ, "MessageID": 1})
    with pytest.raises(CommandError, match="CommandDataSetType"):
        MessageAssembler().feed(1, 0x03, no_data_set_type)


def test_assembler_bounds_the_command_set():
    assembler = MessageAssembler(max_command_length=100)
    assembler.feed(1, 0x01, b"\x00" * 60)
    with pytest.raises(MessageError, match="longer than 100"):
        assembler.feed(1, 0x01, b"\x00" * 41)
    # the default bound: a peer streaming command fragments forever is stopped
    assembler = MessageAssembler()
    with pytest.raises(MessageError):
        for _ in range(messages.MAX_COMMAND_LENGTH // 65536 + 2):
            assembler.feed(1, 0x01, bytes(65536))


def test_events_have_slots():
    for event in (Command(1, {}, False), DataFragment(1, b"", True)):
        with pytest.raises(AttributeError):
            event.extra = 1
        assert repr(event)


# ---------------------------------------------------------------------------
# fragment() against pynetdicom's encode_msg
# ---------------------------------------------------------------------------

MAX_PDU_LENGTHS = [0, 16382, 4096, 257, 7, 8, 13, 255, 1001, 4097, 65535]


def store_case(rng, dataset_length):
    params = {"MessageID": rng.randint(0, 65535), "AffectedSOPClassUID": random_uid(rng),
              "AffectedSOPInstanceUID": random_uid(rng), "Priority": rng.choice([0, 1, 2])}
    dataset = bytes(rng.randrange(256) for _ in range(dataset_length))
    return params, dataset


def dataset_lengths(max_pdu_length):
    if not max_pdu_length:
        return [0, 1, 2, 1000, 50001]
    size = max_pdu_length - 6
    return sorted({0, 1, 2, size - 1, size, size + 1, 2 * size, 3 * size + 5, 20000} - {-1})


@pytest.mark.parametrize("max_pdu_length", MAX_PDU_LENGTHS)
def test_fragment_matches_pynetdicom_encode_msg(max_pdu_length):
    rng = random.Random(max_pdu_length)
    for dataset_length in dataset_lengths(max_pdu_length):
        if max_pdu_length and max_pdu_length < 64 and dataset_length > 5000:
            dataset_length = 5000  # keep the tiny-PDU cases quick
        params, dataset = store_case(rng, dataset_length)
        context_id = rng.choice([1, 3, 127, 255])
        command = encode_command(our_fields(C_STORE_RQ, params, dataset))
        expected = pynetdicom_pdus("C_STORE_RQ", params, dataset, context_id, max_pdu_length)
        ours = list(fragment(context_id, command, dataset, max_pdu_length))
        assert ours == expected, (max_pdu_length, dataset_length)
        for pdu in ours:
            assert isinstance(pdu, bytes)
            if max_pdu_length:
                assert len(pdu) - 6 <= max_pdu_length  # the variable field
            assert len(parse_pdata(pdu)) == 1


@pytest.mark.parametrize("max_pdu_length", MAX_PDU_LENGTHS)
def test_fragment_responses_match_pynetdicom(max_pdu_length):
    rng = random.Random(100 + max_pdu_length)
    for message_type in ["C_STORE_RSP", "C_ECHO_RSP", "C_FIND_RSP", "C_MOVE_RSP", "C_GET_RSP", "C_CANCEL_RQ"]:
        params, dataset = make_case(message_type, rng)
        command = encode_command(our_fields(MESSAGE_TYPES[message_type], params, dataset))
        expected = pynetdicom_pdus(message_type, params, dataset, 1, max_pdu_length)
        assert list(fragment(1, command, dataset, max_pdu_length)) == expected, message_type


@pytest.mark.parametrize("max_pdu_length", [16382, 4096, 257, 7, 8, 13, 1001])
def test_fragment_streams_uneven_chunks_identically(max_pdu_length):
    """An iterable data set gives exactly the PDUs of the joined bytes."""
    rng = random.Random(200 + max_pdu_length)
    size = max_pdu_length - 6
    for trial in range(12):
        total = rng.choice([1, size - 1, size, size + 1, 2 * size, rng.randint(1, 30000)])
        data = bytes(rng.randrange(256) for _ in range(total))
        chunks, offset = [], 0
        while offset < total:
            step = rng.choice([0, 1, 2, size - 1, size, size + 1, rng.randint(1, 3 * size + 7)])
            piece = data[offset : offset + step]
            chunks.append(rng.choice([bytes, bytearray, memoryview])(piece))
            offset += step
        if trial % 3 == 0:
            chunks.append(b"")  # a trailing empty chunk changes nothing
        command = encode_command({"CommandField": C_STORE_RQ, "MessageID": trial, "CommandDataSetType": 1})
        expected = list(fragment(1, command, data, max_pdu_length))
        assert list(fragment(1, command, iter(chunks), max_pdu_length)) == expected
        assert list(fragment(1, command, (c for c in chunks), max_pdu_length)) == expected


def test_fragment_stream_reassembles_with_the_assembler():
    rng = random.Random(31)
    chunks = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 9000))) for _ in range(40)]
    for max_pdu_length in [0, 257, 4096, 16382, 1001]:
        pdvs = pdvs_of(fragment(7, STORE_COMMAND, iter(chunks), max_pdu_length))
        events = feed_all(MessageAssembler(), pdvs)
        assert events[0].fields == VECTOR_FIELDS["c_store_rq_cmd_b"]
        assert b"".join(bytes(e.data) for e in events[1:]) == b"".join(chunks)
        assert [e.last for e in events[1:]][-1] is True
        assert not any(e.last for e in events[1:-1])


def test_fragment_unlimited_stream_sends_one_pdv_per_chunk():
    chunks = [b"abc", b"", b"defg", b"h"]
    pdus = list(fragment(1, ECHO_COMMAND, iter(chunks), 0))
    assert [pdv[1:] for pdv in pdvs_of(pdus)] == [
        (0x03, ECHO_COMMAND), (0x00, b"abc"), (0x00, b"defg"), (0x02, b"h"),
    ]


def test_fragment_empty_data_set_is_not_sent():
    for dataset in [b"", iter([]), iter([b"", b""])]:
        for max_pdu_length in [0, 16382]:
            assert pdvs_of(fragment(1, STORE_COMMAND, dataset, max_pdu_length)) == [(1, 0x03, STORE_COMMAND)]


def test_fragment_streams_lazily():
    """PDUs come out while the data set is still being read: it is never joined first."""
    consumed = []

    def chunks():
        for i in range(1000):
            consumed.append(i)
            yield bytes([i & 0xFF]) * 1000

    pdus = fragment(1, STORE_COMMAND, chunks(), 4096)
    first = [next(pdus) for _ in range(4)]  # the command and three data set PDUs
    assert len(consumed) <= 14
    assert [parse_pdata(p)[0][1] for p in first] == [0x03, 0x00, 0x00, 0x00]
    rest = list(pdus)
    assert len(consumed) == 1000
    assert sum(len(parse_pdata(p)[0][2]) for p in first[1:] + rest) == 1000 * 1000


def test_fragment_command_fragments():
    """A command set longer than one PDV is split with 0x01 ... 0x03."""
    command = VECTOR_FIELDS["c_store_rq_cmd_b"]
    encoded = encode_command(command)
    pdvs = pdvs_of(fragment(1, encoded, None, 64))
    assert [h for _, h, _ in pdvs] == [0x01] * (len(pdvs) - 1) + [0x03]
    assert all(len(d) <= 58 for _, _, d in pdvs)
    assert b"".join(d for _, _, d in pdvs) == encoded


@pytest.mark.parametrize("max_pdu_length", [1, 2, 6, -1])
def test_fragment_rejects_tiny_pdus(max_pdu_length):
    with pytest.raises(ValueError):
        fragment(1, ECHO_COMMAND, None, max_pdu_length)


@pytest.mark.parametrize("context_id", [0, 256, -1])
def test_fragment_rejects_bad_context_ids(context_id):
    with pytest.raises(ValueError):
        fragment(context_id, ECHO_COMMAND)


def test_store_round_trip_without_pydicom():
    """
    The C-STORE SCP's per-message path end to end - fragment, parse, assemble,
    answer - for many messages on one assembler, with no library in it.
    """
    rng = random.Random(41)
    assembler = MessageAssembler()
    for message_id in range(300):
        params, dataset = store_case(rng, rng.choice([0, 1, 500, 16376, 40000]))
        if not dataset:
            dataset = b"\x00"
        command = encode_command(our_fields(C_STORE_RQ, params, dataset))
        events = feed_all(assembler, pdvs_of(fragment(1, command, dataset, 16382)))
        fields = events[0].fields
        assert b"".join(bytes(e.data) for e in events[1:]) == dataset
        rsp = store_rsp(fields["MessageID"], fields["AffectedSOPClassUID"], fields["AffectedSOPInstanceUID"], 0)
        [rsp_pdu] = list(fragment(1, rsp, None, 16382))
        [(cid, header, data)] = parse_pdata(rsp_pdu)
        answer = decode_command(data)
        assert (cid, header) == (1, 0x03)
        assert answer["MessageIDBeingRespondedTo"] == params["MessageID"]
        assert answer["AffectedSOPInstanceUID"] == params["AffectedSOPInstanceUID"]
        assert answer["Status"] == 0


def test_elements_after_the_command_group_are_ignored():
    """
    Orthanc (DCMTK) appends the Failed SOP Instance UID List (0008,0058)
    to the command set of C-GET responses after a failed sub-operation;
    the command decodes as if it were not there.
    """
    fields = {
        "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.3",
        "CommandField": C_GET_RSP,
        "MessageIDBeingRespondedTo": 1,
        "CommandDataSetType": NO_DATASET,
        "Status": 0xFF00,
        "NumberOfRemainingSuboperations": 1,
        "NumberOfCompletedSuboperations": 1,
        "NumberOfFailedSuboperations": 1,
        "NumberOfWarningSuboperations": 0,
    }
    command = encode_command(fields)
    uid = b"1.2.3.4\x00"
    trailer = b"\x08\x00\x00\x00\x04\x00\x00\x00" + struct.pack("<I", 8 + len(uid))
    trailer += b"\x08\x00\x58\x00" + struct.pack("<I", len(uid)) + uid
    decoded = decode_command(command + trailer)
    assert decoded == decode_command(command)
    assert decoded["NumberOfFailedSuboperations"] == 1
