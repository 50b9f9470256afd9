"""
Harmony's Twisted-native DICOM upper layer and DIMSE services (PS3.7, PS3.8).

Sans-IO core (no Twisted imports; bytes in, events/effects out):

  - L{harmony.dimse.pdu}: PDU framing (L{PDUFramer}: offset-based, safe
    byte-at-a-time, maximum PDU length guard) and the PDU model
    (A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT) with
    encode/decode; A-ASSOCIATE PDUs go through pynetdicom's codec classes,
    P-DATA-TF has a C{struct} fast path.
  - L{harmony.dimse.fsm}: the DICOM upper layer state machine of PS3.8
    9.2 (13 states, 19 events, the AE/DT/AR/AA actions) driven by
    pynetdicom's transition I{table}; actions return effects (send a PDU,
    start/stop the ARTIM timer, indicate to the user, close the transport).
  - L{harmony.dimse.negotiation}: presentation context and SCP/SCU role
    negotiation for acceptor and requestor; user identity pass-through.
  - L{harmony.dimse.messages}: DIMSE command sets encoded/decoded with
    C{struct} (byte-identical to pynetdicom), message assembly from PDV
    fragments (datasets streamed fragment by fragment, never collected)
    and fragmentation into P-DATA-TF PDUs under the peer's maximum PDU
    length.

Twisted shell (thin): protocol/factory for acceptor (SCP) and requestor
(SCU), timers from the injected clock, TCP_NODELAY, IPushProducer
backpressure for large datasets.
"""
