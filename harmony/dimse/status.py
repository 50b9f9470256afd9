# -*- test-case-name: tests.unit.test_dimse_store -*-
"""
The one mapping from Harmony's typed errors (and HTTP statuses) to DIMSE
statuses (PS3.4 Annex B/C, PS3.7 Annex C); the table in README.md ("DIMSE
and HTTP statuses") documents it.
"""

from harmony import errors

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: The same code, named as C-FIND/C-GET/C-MOVE name it (PS3.4 C.4.1.1.4).
UNABLE_TO_PROCESS = 0xC000
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: C-GET/C-MOVE (PS3.4 C.4.2.1.4, C.4.3.1.4).
UNABLE_TO_CALCULATE_MATCHES = 0xA701
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
CANCEL = 0xFE00
PENDING = 0xFF00
PENDING_WARNING = 0xFF01

#: Typed error -> failure status.  Transient upstream problems and rate
#: limits answer "Refused: Out of Resources" (the SCU may retry later).
_BY_ERROR = (
    (errors.Unauthorized, NOT_AUTHORIZED),
    (errors.Forbidden, NOT_AUTHORIZED),
    (errors.PayloadTooLarge, OUT_OF_RESOURCES),
    (errors.UnsupportedMediaType, SOP_CLASS_NOT_SUPPORTED),
    (errors.BadRequest, CANNOT_UNDERSTAND),
    (errors.UpstreamUnavailable, OUT_OF_RESOURCES),
    (errors.UpstreamTimeout, OUT_OF_RESOURCES),
    (errors.ServiceUnavailable, OUT_OF_RESOURCES),
    (errors.TooManyRequests, OUT_OF_RESOURCES),
)


def status_for_error(error):
    """
    The DIMSE failure status for a L{harmony.errors.HarmonyError}.
    """
    for kind, status in _BY_ERROR:
        if isinstance(error, kind):
            return status
    return PROCESSING_FAILURE


def status_for_http(code):
    """
    The DIMSE status for an HTTP status a backend answered with.
    """
    if 200 <= code < 300:
        return SUCCESS
    if code in (401, 403):
        return NOT_AUTHORIZED
    if code == 413 or code in (502, 503, 504, 507, 429):
        return OUT_OF_RESOURCES
    if code == 415:
        return SOP_CLASS_NOT_SUPPORTED
    if 400 <= code < 500:
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


def is_failure(status):
    """
    Failure statuses (PS3.7 C): not success, not warning (0001, Bxxx),
    not pending (FF00/FF01), not cancel (FE00).
    """
    return not (status == SUCCESS or status == 0x0001 or (status & 0xF000) == 0xB000 or status in (0xFE00, 0xFF00, 0xFF01))
