"""
A fake PACS for the integration tests: a C-FIND SCP (AE C{FAKEPACS}) on
Harmony's own DIMSE stack that answers any query with as many generated
matches as the query asks for.

    python fake_find_pacs.py PORT

The number of matches is the number at the end of the query's PatientID
(C{PatientID=MATCHES5000} -> 5000 matches; no number -> one match).  Each
match echoes the PatientID and has a distinct StudyInstanceUID
C{1.2.826.0.1.3680043.9.7433.<n>.<i>} (i = 1..n) and generated values for
the other study-level keys the query asks for.

The matches come from a generator (a lazy L{Stream}): nothing but the
match being encoded is held in memory here.  Listens on 127.0.0.1 only;
stops on SIGTERM.
"""

import re
import sys

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from twisted.internet import defer, reactor

from harmony.dimse import messages
from harmony.dimse.association import AssociationSettings
from harmony.dimse.find import FindService
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import PATIENT_ROOT_FIND, STUDY_ROOT_FIND
from harmony.envelope import DicomResult, ResponseEnvelope
from harmony.streams import EOF, Stream

AET = "FAKEPACS"
UID_ROOT = "1.2.826.0.1.3680043.9.7433"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def match_count(identifier):
    found = re.search(r"(\d+)$", str(identifier.get("PatientID", "") or ""))
    return int(found.group(1)) if found else 1


def generate(identifier, n):
    """
    The n matches of a query, one at a time.
    """
    patient_id = str(identifier.get("PatientID", "") or "FAKE")
    values = {
        "PatientName": lambda i: f"FAKE^PATIENT^{i}",
        "PatientBirthDate": lambda i: "19700101",
        "PatientSex": lambda i: "O",
        "StudyDate": lambda i: "20240101",
        "StudyTime": lambda i: "120000",
        "AccessionNumber": lambda i: f"A{i:010d}",
        "StudyDescription": lambda i: f"Generated study {i} of {n}",
        "StudyID": lambda i: str(i),
        "ModalitiesInStudy": lambda i: "CT",
        "NumberOfStudyRelatedInstances": lambda i: "1",
        "NumberOfStudyRelatedSeries": lambda i: "1",
    }
    wanted = [e.keyword for e in identifier if e.keyword and e.keyword not in ("QueryRetrieveLevel", "PatientID")]
    for i in range(1, n + 1):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = f"{UID_ROOT}.{n}.{i}"
        for keyword in wanted:
            if keyword == "StudyInstanceUID":
                continue
            make = values.get(keyword)
            setattr(ds, keyword, make(i) if make else "")
        yield ds


class Executor:
    """
    Stands in for a pipeline: every find is answered by the generator.
    """

    backends = ("fake",)
    request_chain = response_chain = ()

    def execute(self, endpoint, envelope):
        identifier = envelope.dicom.identifier
        n = match_count(identifier)
        print(f"FAKEPACS query from {envelope.dicom.calling_aet}: {n} matches", flush=True)
        iterator = generate(identifier, n)
        matches = Stream(high_water=64, pull=lambda: next(iterator, EOF))
        result = DicomResult(status=None, matches=matches, done=defer.succeed((0x0000, None)))
        return defer.succeed(ResponseEnvelope(status=200, dicom=result))


def main(port):
    policy = SCPPolicy(
        ae_title=AET,
        syntaxes={
            messages.VERIFICATION_SOP_CLASS: SYNTAXES,
            STUDY_ROOT_FIND: SYNTAXES,
            PATIENT_ROOT_FIND: SYNTAXES,
        },
        require_called_aet=True,
    )
    factory = DicomServerFactory(
        reactor,
        policy,
        AssociationSettings(),
        {messages.C_FIND_RQ: FindService((Executor(), "fake"))},
    )
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print(f"FAKEPACS listening on 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
