"""
Tests for L{harmony.dicomweb.accept}: Accept parsing and negotiation for
DICOMweb resources, including what dicomweb-client sends.
"""

import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import BaseAdapter
from twisted.trial.unittest import SynchronousTestCase

from harmony.dicomweb.accept import (
    Choice,
    MediaRange,
    media_type_for_transfer_syntax,
    negotiate,
    parse_accept,
)
from harmony.errors import BadRequest, NotAcceptable

ELE = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"
DICOM, JSON, XML, OCTET = (
    "application/dicom",
    "application/dicom+json",
    "application/dicom+xml",
    "application/octet-stream",
)


class ParseAcceptTests(SynchronousTestCase):
    def test_no_header_is_anything(self):
        for values in (None, [], [""], ["  "]):
            self.assertEqual(parse_accept(values), [MediaRange("*/*", {}, 1.0)])

    def test_sorted_by_q_stable_and_q0_dropped(self):
        ranges = parse_accept(["text/plain;q=0.5, image/png, image/gif;q=0", "image/jpeg ;q=1, text/html; q=0.5"])
        self.assertEqual(
            [(r.type, r.q) for r in ranges],
            [("image/png", 1.0), ("image/jpeg", 1.0), ("text/plain", 0.5), ("text/html", 0.5)],
        )

    def test_quoted_parameters(self):
        (r,) = parse_accept(['Multipart/Related; Type="application/dicom; transfer-syntax=1.2.3"; q=0.9'])
        self.assertEqual(r.type, "multipart/related")
        self.assertEqual(r.params, {"type": "application/dicom; transfer-syntax=1.2.3"})
        self.assertEqual(r.q, 0.9)
        self.assertTrue(r.multipart)
        self.assertEqual(r.part_type, DICOM)
        self.assertEqual(r.transfer_syntax, "1.2.3")
        (r,) = parse_accept(['multipart/related; type="application/dicom"; transfer-syntax=*'])
        self.assertEqual(r.transfer_syntax, "*")
        ranges = parse_accept(['multipart/related; type="a/b, c/d", image/png'])
        self.assertEqual(
            [(r.type, r.params) for r in ranges], [("multipart/related", {"type": "a/b, c/d"}), ("image/png", {})]
        )

    def test_empty_subtype_is_wildcard(self):
        self.assertEqual(parse_accept(["image/"])[0].type, "image/*")

    def test_malformed(self):
        for bad in [
            "image",
            "*/json",
            'multipart/related; type="unterminated',
            "a/b; q=2",
            "a/b; q=x",
            "a/b; q=0.12345",
            "a/b; flag",
            "a b/c",
        ]:
            with self.assertRaises(BadRequest, msg=bad):
                parse_accept([bad])

    def test_empty_list_elements_skipped(self):
        self.assertEqual([r.type for r in parse_accept([", image/png,,"])], ["image/png"])


def _check(test, kind, table):
    for accept, expected in table:
        values = accept if isinstance(accept, list) else [accept]
        if expected is None:
            with test.assertRaises(NotAcceptable, msg=f"{kind}: {accept}"):
                negotiate(kind, values)
        else:
            test.assertEqual(negotiate(kind, values), expected, f"{kind}: {accept}")


class NegotiateTests(SynchronousTestCase):
    def test_instances(self):
        _check(
            self,
            "instances",
            [
                ('multipart/related; type="application/dicom"', Choice(DICOM, True, None)),
                (
                    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
                    Choice(DICOM, True, JPEG),
                ),
                (
                    'multipart/related; type="application/dicom; transfer-syntax=1.2.840.10008.1.2.1"',
                    Choice(DICOM, True, ELE),
                ),
                ("multipart/related; type=application/dicom; transfer-syntax=*", Choice(DICOM, True, "*")),
                ("*/*", Choice(DICOM, True, None)),
                (None, Choice(DICOM, True, None)),
                ("multipart/*", Choice(DICOM, True, None)),
                ("multipart/related", Choice(DICOM, True, None)),
                ('multipart/related; type="*/*"', Choice(DICOM, True, None)),
                ("application/dicom", Choice(DICOM, True, None)),
                ('multipart/related; type="application/octet-stream"', None),
                ("application/dicom+json", None),
                ("image/jpeg", None),
                ('multipart/related; type="application/dicom"; transfer-syntax=not-a-uid', None),
                ('image/png, multipart/related; type="application/dicom";q=0.1', Choice(DICOM, True, None)),
            ],
        )

    def test_metadata_and_search(self):
        for kind in ("metadata", "search"):
            _check(
                self,
                kind,
                [
                    ("application/dicom+json", Choice(JSON, False, None)),
                    ("application/json", Choice(JSON, False, None)),
                    ("application/*", Choice(JSON, False, None)),
                    ("*/*", Choice(JSON, False, None)),
                    (None, Choice(JSON, False, None)),
                    ('multipart/related; type="application/dicom+xml"', Choice(XML, True, None)),
                    ("application/dicom+xml", Choice(XML, True, None)),
                    ("application/dicom+xml, application/dicom+json;q=0.5", Choice(XML, True, None)),
                    ("application/dicom+xml;q=0.5, application/dicom+json", Choice(JSON, False, None)),
                    ('multipart/related; type="application/dicom"', None),
                    ("text/html", None),
                ],
            )

    def test_frames(self):
        _check(
            self,
            "frames",
            [
                ('multipart/related; type="application/octet-stream"', Choice(OCTET, True, ELE)),
                ('multipart/related; type="application/octet-stream"; transfer-syntax=*', Choice(OCTET, True, "*")),
                (
                    f'multipart/related; type="application/octet-stream"; transfer-syntax={ELE}',
                    Choice(OCTET, True, ELE),
                ),
                (f'multipart/related; type="application/octet-stream"; transfer-syntax={JPEG}', None),
                ('multipart/related; type="image/jpeg"', Choice("image/jpeg", True, JPEG)),
                (
                    'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.70',
                    Choice("image/jpeg", True, "1.2.840.10008.1.2.4.70"),
                ),
                (
                    'multipart/related; type="image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.51"',
                    Choice("image/jpeg", True, "1.2.840.10008.1.2.4.51"),
                ),
                ('multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.90', None),
                ('multipart/related; type="image/jls"', Choice("image/jls", True, "1.2.840.10008.1.2.4.80")),
                ('multipart/related; type="image/x-jls"', Choice("image/jls", True, "1.2.840.10008.1.2.4.80")),
                ('multipart/related; type="image/jp2"', Choice("image/jp2", True, "1.2.840.10008.1.2.4.90")),
                ('multipart/related; type="image/jpx"', Choice("image/jpx", True, "1.2.840.10008.1.2.4.92")),
                (
                    'multipart/related; type="image/jpx"; transfer-syntax=1.2.840.10008.1.2.4.93',
                    Choice("image/jpx", True, "1.2.840.10008.1.2.4.93"),
                ),
                ('multipart/related; type="image/dicom-rle"', Choice("image/dicom-rle", True, "1.2.840.10008.1.2.5")),
                ('multipart/related; type="image/x-dicom-rle"', Choice("image/dicom-rle", True, "1.2.840.10008.1.2.5")),
                ('multipart/related; type="*/*"', Choice("*/*", True, "*")),
                ("multipart/related", Choice("*/*", True, "*")),
                ("*/*", Choice("*/*", True, "*")),
                (None, Choice("*/*", True, "*")),
                ("application/octet-stream", Choice(OCTET, False, ELE)),
                ("application/octet-stream; transfer-syntax=*", Choice(OCTET, False, "*")),
                ('multipart/related; type="image/*"', None),
                ("image/jpeg", None),
                ('multipart/related; type="image/png"', None),
                (
                    'multipart/related; type="image/gif", multipart/related; type="application/octet-stream"',
                    Choice(OCTET, True, ELE),
                ),
            ],
        )

    def test_bulkdata(self):
        _check(
            self,
            "bulkdata",
            [
                ('multipart/related; type="application/octet-stream"', Choice(OCTET, True, None)),
                (
                    f'multipart/related; type="application/octet-stream"; transfer-syntax={ELE}',
                    Choice(OCTET, True, None),
                ),
                ('multipart/related; type="*/*"', Choice(OCTET, True, None)),
                ("multipart/related", Choice(OCTET, True, None)),
                ("*/*", Choice(OCTET, True, None)),
                (None, Choice(OCTET, True, None)),
                ("application/octet-stream", Choice(OCTET, False, None)),
                (f'multipart/related; type="application/octet-stream"; transfer-syntax={JPEG}', None),
                ('multipart/related; type="application/dicom"', None),
                ("application/dicom+json", None),
            ],
        )

    def test_rendered_and_thumbnail(self):
        for kind in ("rendered", "thumbnail"):
            _check(
                self,
                kind,
                [
                    ("image/jpeg", Choice("image/jpeg", False, None)),
                    ("image/png", Choice("image/png", False, None)),
                    ("image/gif", Choice("image/gif", False, None)),
                    ("image/*", Choice("image/jpeg", False, None)),
                    ("image/", Choice("image/jpeg", False, None)),
                    ("*/*", Choice("image/jpeg", False, None)),
                    (None, Choice("image/jpeg", False, None)),
                    ("image/png;q=0.8, image/gif", Choice("image/gif", False, None)),
                    ("image/jp2", None),
                    ("application/dicom", None),
                    ('multipart/related; type="image/jpeg"', None),
                ],
            )

    def test_not_acceptable_names_what_is_available(self):
        with self.assertRaises(NotAcceptable) as e:
            negotiate("metadata", ["text/html"])
        self.assertIn("application/dicom+json", e.exception.message)
        self.assertEqual(e.exception.status, 406)

    def test_malformed_accept_is_bad_request(self):
        with self.assertRaises(BadRequest):
            negotiate("instances", ['multipart/related; type="application/dicom'])

    def test_unknown_kind(self):
        with self.assertRaises(ValueError):
            negotiate("nonsense", None)


class MediaTypeForTransferSyntaxTests(SynchronousTestCase):
    def test_table(self):
        table = {
            "1.2.840.10008.1.2.4.50": "image/jpeg",
            "1.2.840.10008.1.2.4.51": "image/jpeg",
            "1.2.840.10008.1.2.4.57": "image/jpeg",
            "1.2.840.10008.1.2.4.70": "image/jpeg",
            "1.2.840.10008.1.2.4.80": "image/jls",
            "1.2.840.10008.1.2.4.81": "image/jls",
            "1.2.840.10008.1.2.4.90": "image/jp2",
            "1.2.840.10008.1.2.4.91": "image/jp2",
            "1.2.840.10008.1.2.4.92": "image/jpx",
            "1.2.840.10008.1.2.4.93": "image/jpx",
            "1.2.840.10008.1.2.5": "image/dicom-rle",
            "1.2.840.10008.1.2": OCTET,
            "1.2.840.10008.1.2.1": OCTET,
            "1.2.840.10008.1.2.2": OCTET,
            "1.2.840.10008.1.2.1.99": OCTET,
            "1.2.3.4": OCTET,
        }
        for uid, mtype in table.items():
            self.assertEqual(media_type_for_transfer_syntax(uid), mtype, uid)


class _Captured(Exception):
    pass


class _CapturingAdapter(BaseAdapter):
    """
    A requests transport that records the Accept header of each request
    and fails it (no network).
    """

    def __init__(self):
        super().__init__()
        self.accept = []

    def send(self, request, **kwargs):
        self.accept.append(request.headers.get("Accept"))
        raise _Captured()

    def close(self):
        pass


class DicomwebClientTests(SynchronousTestCase):
    """
    Every retrieval/search call of dicomweb-client 0.61 negotiates (its
    Accept headers are captured from the real client code).
    """

    def _accept_of(self, call):
        adapter = _CapturingAdapter()
        session = requests.Session()
        session.mount("http://", adapter)
        client = DICOMwebClient("http://pacs.example/dicom-web", session=session)
        client.set_http_retry_params(retry=False)
        try:
            result = call(client)
            list(result)  # generators send when iterated
        except _Captured:
            pass
        self.assertEqual(len(adapter.accept), 1)
        return adapter.accept[0]

    def test_client_calls(self):
        st, se, sop = "1.2.3", "1.2.3.4", "1.2.3.4.5"
        cases = [
            ("search", lambda c: c.search_for_studies(), Choice(JSON, False, None)),
            ("search", lambda c: c.search_for_series(st), Choice(JSON, False, None)),
            ("search", lambda c: c.search_for_instances(st, se), Choice(JSON, False, None)),
            ("metadata", lambda c: c.retrieve_study_metadata(st), Choice(JSON, False, None)),
            ("metadata", lambda c: c.retrieve_series_metadata(st, se), Choice(JSON, False, None)),
            ("metadata", lambda c: c.retrieve_instance_metadata(st, se, sop), Choice(JSON, False, None)),
            ("instances", lambda c: c.retrieve_study(st), Choice(DICOM, True, None)),
            ("instances", lambda c: c.iter_series(st, se), Choice(DICOM, True, None)),
            # retrieve_instance asks for transfer-syntax=* by default.
            ("instances", lambda c: c.retrieve_instance(st, se, sop), Choice(DICOM, True, "*")),
            (
                "instances",
                lambda c: c.retrieve_instance(st, se, sop, media_types=((DICOM, ELE),)),
                Choice(DICOM, True, ELE),
            ),
            ("instances", lambda c: c.retrieve_study(st, media_types=((DICOM, "*"),)), Choice(DICOM, True, "*")),
            ("instances", lambda c: c.retrieve_series(st, se, media_types=((DICOM, JPEG),)), Choice(DICOM, True, JPEG)),
            ("frames", lambda c: c.retrieve_instance_frames(st, se, sop, [1, 2]), Choice("*/*", True, "*")),
            (
                "frames",
                lambda c: c.retrieve_instance_frames(st, se, sop, [1], media_types=(OCTET,)),
                Choice(OCTET, True, ELE),
            ),
            (
                "frames",
                lambda c: c.retrieve_instance_frames(st, se, sop, [1], media_types=((OCTET, ELE),)),
                Choice(OCTET, True, ELE),
            ),
            (
                "frames",
                lambda c: c.retrieve_instance_frames(st, se, sop, [1], media_types=(("image/jpeg", JPEG),)),
                Choice("image/jpeg", True, JPEG),
            ),
            (
                "frames",
                lambda c: c.retrieve_instance_frames(st, se, sop, [1], media_types=("image/jp2",)),
                Choice("image/jp2", True, "1.2.840.10008.1.2.4.90"),
            ),
            (
                "frames",
                lambda c: c.retrieve_instance_frames(
                    st, se, sop, [1], media_types=(("image/x-jls", "1.2.840.10008.1.2.4.81"),)
                ),
                Choice("image/jls", True, "1.2.840.10008.1.2.4.81"),
            ),
            (
                "frames",
                lambda c: c.retrieve_instance_frames(st, se, sop, [1], media_types=("image/jpeg", OCTET)),
                Choice("image/jpeg", True, JPEG),
            ),
            (
                "bulkdata",
                lambda c: c.retrieve_bulkdata("http://pacs.example/dicom-web/bulk/7FE00010"),
                Choice(OCTET, True, None),
            ),
            (
                "bulkdata",
                lambda c: c.retrieve_bulkdata("http://pacs.example/b", media_types=(OCTET,)),
                Choice(OCTET, True, None),
            ),
            ("rendered", lambda c: c.retrieve_instance_rendered(st, se, sop), Choice("image/jpeg", False, None)),
            (
                "rendered",
                lambda c: c.retrieve_instance_rendered(st, se, sop, media_types=("image/png",)),
                Choice("image/png", False, None),
            ),
            (
                "rendered",
                lambda c: c.retrieve_series_rendered(st, se, media_types=("image/",)),
                Choice("image/jpeg", False, None),
            ),
            (
                "rendered",
                lambda c: c.retrieve_instance_frames_rendered(st, se, sop, [1], media_types=("image/gif",)),
                Choice("image/gif", False, None),
            ),
            (
                "rendered",
                lambda c: c.retrieve_instance_frames_rendered(st, se, sop, [1]),
                Choice("image/jpeg", False, None),
            ),
        ]
        for kind, call, expected in cases:
            accept = self._accept_of(call)
            self.assertEqual(negotiate(kind, [accept]), expected, f"{kind}: {accept}")
