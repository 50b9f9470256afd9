"""
The real peers the integration tests talk to: they run, answer, and are
reachable on loopback only.
"""

from peers import dcmtk, listening_addresses


def test_orthanc_listens_on_loopback_only(orthanc):
    addresses = listening_addresses(orthanc.process.popen.pid)
    ports = {port for _, port in addresses}
    assert {orthanc.http_port, orthanc.dicom_port} <= ports, addresses
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in addresses), addresses
    system = orthanc.get_json("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert "dicom-web" in orthanc.get_json("/plugins")


def test_dcmtk_echoscu_against_orthanc(orthanc):
    result = dcmtk("echoscu", "-aet", "HARMONY_TEST", "-aec", orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    assert result.returncode == 0, result.stdout + result.stderr
    # A wrong port is an error (the check above can fail).
    refused = dcmtk("echoscu", "-to", "5", "-aec", orthanc.aet, "127.0.0.1", 1)
    assert refused.returncode != 0
