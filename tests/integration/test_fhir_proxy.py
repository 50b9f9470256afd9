"""
The C{fhir} endpoint and C{fhir} backend end to end: a real C{twistd
harmony} in front of a real FHIR R4 server (the session's C{fhir_server}:
Medplum's FHIR router over its in-memory store, tests/fhir_server).

Pipelines: C{/fhir} -> the FHIR server; C{/fhir-down} -> a port nobody
listens on.  The service type comes from
C{[services.fhir] module = "harmony.endpoints.fhir:SERVICE_TYPE"}.

The FHIR server's own links are absolute URLs under its base
(C{http://127.0.0.1:<port>/fhir/R4}); through Harmony every link must
point at Harmony (C{http://127.0.0.1:<harmony port>/fhir}).
"""

import json
import uuid
from types import SimpleNamespace
from urllib.parse import urlencode, urlsplit

import pytest

from harmonytest import base_config, free_port, request, start_harmony, write_config

FHIR_JSON = "application/fhir+json"


def fhir_pipelines(upstream_url, down_url):
    return {
        "10-fhir": f"""
[services.fhir]
module = "harmony.endpoints.fhir:SERVICE_TYPE"

[pipelines.fhir]
description = "FHIR endpoint -> FHIR backend -> the test FHIR server"
networks = ["default"]
endpoints = ["fhir"]
backends = ["fhir_server"]

[endpoints.fhir]
service = "fhir"
[endpoints.fhir.options]
path_prefix = "/fhir"

[backends.fhir_server]
service = "fhir"
[backends.fhir_server.options]
base_url = "{upstream_url}"
timeout_secs = 10
""",
        "20-down": f"""
[pipelines.fhir_down]
networks = ["default"]
endpoints = ["fhir_down"]
backends = ["fhir_nobody"]

[endpoints.fhir_down]
service = "fhir"
[endpoints.fhir_down.options]
path_prefix = "/fhir-down"

[backends.fhir_nobody]
service = "fhir"
[backends.fhir_nobody.options]
base_url = "{down_url}"
timeout_secs = 5
""",
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory, fhir_server):
    directory = tmp_path_factory.mktemp("fhir-proxy")
    port = free_port()
    config = write_config(
        directory,
        base_config(port),
        fhir_pipelines(fhir_server.url, f"http://127.0.0.1:{free_port()}/fhir"),
    )
    proc = start_harmony(directory, config, port)
    yield SimpleNamespace(
        port=port,
        base=f"http://127.0.0.1:{port}/fhir",
        upstream=fhir_server.url,
        process=proc,
    )
    proc.stop_cleanly()


def call(gw, method, path, resource=None, body=None, headers=(), content_type=FHIR_JSON):
    """
    One request to Harmony under /fhir; C{resource} is sent as FHIR JSON.
    """
    headers = list(headers)
    if resource is not None:
        body = json.dumps(resource).encode()
    if body is not None and content_type:
        headers.append(("Content-Type", content_type))
    return request(gw.port, method, "/fhir" + path, body=body, headers=headers)


def harmony_path(gw, url):
    """
    The path (and query) of an absolute URL that must point at Harmony.
    """
    assert url.startswith(gw.base + "/"), url
    parts = urlsplit(url)
    return parts.path[len("/fhir") :] + ("?" + parts.query if parts.query else "")


def assert_outcome(resp, status, code=None):
    assert resp.status == status, resp
    assert resp.header("Content-Type").startswith(FHIR_JSON), resp
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    if code is not None:
        assert outcome["issue"][0]["code"] == code, outcome
    return outcome


def assert_no_upstream_url(gw, resp):
    assert gw.upstream.encode() not in resp.body, resp
    for name in ("Location", "Content-Location"):
        value = resp.header(name)
        assert value is None or not value.startswith(gw.upstream), resp


def token():
    return "H" + uuid.uuid4().hex[:12]


def new_patient(family, given="Ann", **extra):
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], **extra}


# -- CRUD ----------------------------------------------------------------------


def test_patient_create_read_update_delete(gw):
    family = token()
    created = call(gw, "POST", "/Patient", new_patient(family, gender="female"))
    assert created.status == 201, created
    assert created.header("Content-Type").startswith(FHIR_JSON)
    patient = created.json()
    pid, vid = patient["id"], patient["meta"]["versionId"]
    assert created.header("Location") == f"{gw.base}/Patient/{pid}/_history/{vid}"
    assert created.header("ETag") == f'W/"{vid}"'
    assert created.header("Last-Modified")

    # The Location leads back through Harmony (a vread).
    vread = call(gw, "GET", harmony_path(gw, created.header("Location")))
    assert vread.status == 200, vread
    assert vread.json()["meta"]["versionId"] == vid

    read = call(gw, "GET", f"/Patient/{pid}")
    assert read.status == 200, read
    assert read.json()["name"][0]["family"] == family
    assert read.header("ETag") == f'W/"{vid}"'
    assert read.header("Content-Location") == f"{gw.base}/Patient/{pid}/_history/{vid}"
    assert_no_upstream_url(gw, read)

    patient["gender"] = "male"
    updated = call(gw, "PUT", f"/Patient/{pid}", patient, headers=[("If-Match", f'W/"{vid}"')])
    assert updated.status == 200, updated
    assert updated.json()["gender"] == "male"
    new_vid = updated.json()["meta"]["versionId"]
    assert new_vid != vid
    assert updated.header("ETag") == f'W/"{new_vid}"'

    # A stale If-Match is the upstream's 412 OperationOutcome, passed through.
    stale = call(gw, "PUT", f"/Patient/{pid}", patient, headers=[("If-Match", f'W/"{vid}"')])
    assert_outcome(stale, 412)

    history = call(gw, "GET", f"/Patient/{pid}/_history")
    assert history.status == 200, history
    bundle = history.json()
    assert bundle["type"] == "history"
    assert {e["resource"]["meta"]["versionId"] for e in bundle["entry"]} == {vid, new_vid}
    assert all(e["fullUrl"] == f"{gw.base}/Patient/{pid}" for e in bundle["entry"])
    assert_no_upstream_url(gw, history)

    deleted = call(gw, "DELETE", f"/Patient/{pid}")
    assert deleted.status == 200, deleted
    gone = call(gw, "GET", f"/Patient/{pid}")
    assert_outcome(gone, 404, "not-found")


def test_update_as_create_and_patch(gw):
    pid = "harmony-" + uuid.uuid4().hex[:8]
    created = call(gw, "PUT", f"/Patient/{pid}", new_patient(token(), id=pid))
    assert created.status == 201, created
    assert created.header("Location").startswith(f"{gw.base}/Patient/{pid}/_history/")

    patched = call(
        gw,
        "PATCH",
        f"/Patient/{pid}",
        body=b'[{"op": "add", "path": "/birthDate", "value": "1970-01-02"}]',
        content_type="application/json-patch+json",
    )
    assert patched.status == 200, patched
    assert patched.json()["birthDate"] == "1970-01-02"
    assert call(gw, "GET", f"/Patient/{pid}").json()["birthDate"] == "1970-01-02"


def test_conditional_create(gw):
    system, value = "urn:harmony-test:mrn", token()
    patient = new_patient(token(), identifier=[{"system": system, "value": value}])
    condition = [("If-None-Exist", urlencode({"identifier": f"{system}|{value}"}))]
    first = call(gw, "POST", "/Patient", patient, headers=condition)
    assert first.status == 201, first
    again = call(gw, "POST", "/Patient", patient, headers=condition)
    assert again.status == 200, again
    assert again.json()["id"] == first.json()["id"]
    found = call(gw, "GET", "/Patient?" + urlencode({"identifier": f"{system}|{value}"})).json()
    assert found["total"] == 1


def test_observation_crud_and_search(gw):
    pid = call(gw, "POST", "/Patient", new_patient(token())).json()["id"]
    code = token()
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "urn:harmony-test:code", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {"value": 72.50, "unit": "beats/minute"},
    }
    created = call(gw, "POST", "/Observation", observation)
    assert created.status == 201, created
    oid = created.json()["id"]
    assert created.header("Location").startswith(f"{gw.base}/Observation/{oid}/_history/")

    read = call(gw, "GET", f"/Observation/{oid}")
    assert read.status == 200
    assert read.json()["subject"] == {"reference": f"Patient/{pid}"}

    query = urlencode({"subject": f"Patient/{pid}", "code": f"urn:harmony-test:code|{code}"})
    search = call(gw, "GET", f"/Observation?{query}")
    assert search.status == 200, search
    bundle = search.json()
    assert bundle["type"] == "searchset"
    assert [e["resource"]["id"] for e in bundle["entry"]] == [oid]
    assert bundle["entry"][0]["fullUrl"] == f"{gw.base}/Observation/{oid}"
    assert all(link["url"].startswith(gw.base + "/Observation?") for link in bundle["link"])
    assert_no_upstream_url(gw, search)
    # The rewritten (re-serialised) Bundle keeps numbers as the upstream wrote them.
    assert b'"value":72.5,' in search.body

    observation["id"] = oid
    observation["status"] = "amended"
    assert call(gw, "PUT", f"/Observation/{oid}", observation).json()["status"] == "amended"
    assert call(gw, "DELETE", f"/Observation/{oid}").status == 200
    assert_outcome(call(gw, "GET", f"/Observation/{oid}"), 404, "not-found")
    after = call(gw, "GET", f"/Observation?{query}").json()
    assert after["total"] == 0


def test_search_post_form(gw):
    family = token()
    ids = {call(gw, "POST", "/Patient", new_patient(family, given=g)).json()["id"] for g in ("A", "B")}
    resp = call(
        gw,
        "POST",
        "/Patient/_search",
        body=urlencode({"family": family}).encode(),
        content_type="application/x-www-form-urlencoded",
    )
    assert resp.status == 200, resp
    bundle = resp.json()
    assert {e["resource"]["id"] for e in bundle["entry"]} == ids
    assert_no_upstream_url(gw, resp)

    # A search body that is not a form is refused by the endpoint.
    wrong = call(gw, "POST", "/Patient/_search", body=b'{"family": "x"}', content_type="application/json")
    assert_outcome(wrong, 415, "not-supported")


# -- paging ------------------------------------------------------------------------


def test_paging_follows_next_links_through_harmony(gw):
    family = token()
    created = {call(gw, "POST", "/Patient", new_patient(family, given=f"P{i:02d}")).json()["id"] for i in range(25)}
    assert len(created) == 25
    path = "/Patient?" + urlencode({"family": family, "_count": 10})
    seen, pages = [], 0
    while path is not None:
        resp = call(gw, "GET", path)
        assert resp.status == 200, resp
        assert_no_upstream_url(gw, resp)
        bundle = resp.json()
        pages += 1
        assert bundle["total"] == 25
        for entry in bundle.get("entry", []):
            assert entry["fullUrl"] == f"{gw.base}/Patient/{entry['resource']['id']}"
            seen.append(entry["resource"]["id"])
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert links["self"].startswith(gw.base + "/Patient?")
        nxt = links.get("next")
        path = harmony_path(gw, nxt) if nxt else None
        assert pages <= 3
    assert pages == 3
    assert len(seen) == 25
    assert set(seen) == created


# -- batch / transaction -------------------------------------------------------------


def test_transaction_bundle(gw):
    family = token()
    placeholder = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": placeholder, "resource": new_patient(family), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "heart rate"},
                    "subject": {"reference": placeholder},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    resp = call(gw, "POST", "", bundle)
    assert resp.status == 200, resp
    result = resp.json()
    assert result["type"] == "transaction-response"
    patient_entry, observation_entry = result["entry"]
    assert patient_entry["response"]["status"].startswith("201")
    pid = patient_entry["resource"]["id"]
    oid = observation_entry["resource"]["id"]
    assert patient_entry["fullUrl"] == f"{gw.base}/Patient/{pid}"
    assert observation_entry["fullUrl"] == f"{gw.base}/Observation/{oid}"
    assert_no_upstream_url(gw, resp)
    stored = call(gw, "GET", f"/Observation/{oid}").json()
    assert stored["subject"]["reference"] == f"Patient/{pid}"

    # An invalid entry fails the whole transaction with the upstream's 400;
    # nothing is stored.
    bundle["entry"][1]["resource"].pop("code")
    other = token()
    bundle["entry"][0]["resource"]["name"][0]["family"] = other
    failed = call(gw, "POST", "", bundle)
    outcome = assert_outcome(failed, 400)
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[1].resource.code"]
    assert call(gw, "GET", "/Patient?" + urlencode({"family": other})).json()["total"] == 0


# -- errors --------------------------------------------------------------------------


def test_upstream_operation_outcomes_pass_through(gw):
    missing = call(gw, "GET", f"/Patient/{uuid.uuid4()}")
    outcome = assert_outcome(missing, 404, "not-found")
    assert outcome.get("id") == "not-found"  # the upstream's own OperationOutcome

    invalid = call(gw, "POST", "/Patient", {"resourceType": "Patient", "notAnElement": 1})
    outcome = assert_outcome(invalid, 400)
    assert outcome["issue"][0]["expression"] == ["Patient.notAnElement"]

    unknown = call(gw, "GET", "/Patient?notAParameter=1")
    assert_outcome(unknown, 400, "invalid")


def test_non_fhir_create_body_is_415_before_the_upstream(gw):
    family = token()
    body = urlencode({"resourceType": "Patient", "family": family}).encode()
    resp = call(gw, "POST", "/Patient", body=body, content_type="application/x-www-form-urlencoded")
    outcome = assert_outcome(resp, 415, "not-supported")
    assert "FHIR JSON or XML" in outcome["issue"][0]["details"]["text"]
    resp = call(gw, "PUT", "/Patient/x1", body=b"name=x", content_type="text/plain")
    assert_outcome(resp, 415, "not-supported")
    resp = call(gw, "POST", "/Patient", body=b"{}", content_type="")
    assert_outcome(resp, 415, "not-supported")
    assert call(gw, "GET", "/Patient?" + urlencode({"family": family})).json()["total"] == 0


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("GET", "/patient/1", 400, "invalid"),
        ("GET", "/Patient/bad%20id", 400, "invalid"),
        ("GET", "/Patient/" + "x" * 65, 400, "invalid"),
        ("GET", "/Patient/1/_history/2/extra", 404, "not-found"),
        ("DELETE", "/Patient/1/_history", 405, "not-supported"),
        ("POST", "/Patient/1", 405, "not-supported"),
        ("PUT", "/Patient", 400, "invalid"),
        ("GET", "/Patient?_format=yaml", 400, "invalid"),
    ],
)
def test_malformed_fhir_urls(gw, method, path, status, code):
    body = b"{}" if method in ("POST", "PUT") else None
    resp = call(gw, method, path, body=body)
    assert_outcome(resp, status, code)
    if status == 405:
        assert "GET" in resp.header("Allow") or "PUT" in resp.header("Allow")


def test_unreachable_upstream_is_a_502_operation_outcome(gw):
    resp = request(gw.port, "GET", "/fhir-down/Patient/1")
    assert_outcome(resp, 502, "transient")


def test_metadata_is_the_upstreams_with_harmonys_url(gw):
    resp = call(gw, "GET", "/metadata?_format=json")
    assert resp.status == 200, resp
    statement = resp.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["implementation"]["url"] == gw.base
    assert statement["fhirVersion"] == "4.0.1"


# -- a real FHIR client ------------------------------------------------------------------


def test_fhirclient_through_harmony(gw):
    from fhirclient import client
    from fhirclient.models.patient import Patient
    from fhirclient.server import FHIRNotFoundException

    smart = client.FHIRClient(settings={"app_id": "harmony-tests", "api_base": gw.base + "/"})
    server = smart.server
    family = token()
    ids = set()
    for i in range(5):
        patient = Patient(new_patient(family, given=f"C{i}"), strict=True)
        result = patient.create(server)
        ids.add(result["id"])

    some_id = sorted(ids)[0]
    read = Patient.read(some_id, server)
    assert read.id == some_id
    assert read.name[0].family == family

    search = Patient.where({"family": family, "_count": "2"})
    bundles = list(search.perform_iter(server))
    assert len(bundles) == 3
    for bundle in bundles[:-1]:
        [nxt] = [link.url for link in bundle.link if link.relation == "next"]
        assert nxt.startswith(gw.base + "/Patient?"), nxt
    found = {p.id for p in search.perform_resources_iter(server)}
    assert found == ids

    with pytest.raises(FHIRNotFoundException):
        Patient.read(str(uuid.uuid4()), server)
