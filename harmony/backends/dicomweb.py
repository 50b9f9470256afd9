# -*- test-case-name: tests.unit.test_dicomweb_backend -*-
"""
The C{dicomweb} backend: the C{http} reverse proxy (L{HttpBackend}, same
pooled agent, timeouts, hop-by-hop hygiene and C{Forwarded} headers) in
front of an upstream DICOMweb server (QIDO-RS, WADO-RS, STOW-RS: every
path under the endpoint's prefix goes to the same path under
C{base_url}), with the upstream's own URLs in its answers replaced by
Harmony's, so that a client following a C{RetrieveURL} or a
C{BulkDataURI} comes back through Harmony.

Requests go through untouched: method, path, query, C{Accept},
C{Content-Type} (STOW-RS multipart bodies) and the body, streamed;
except C{Accept-Encoding}, which becomes C{identity} (a gzipped answer
could not have its URLs rewritten), and percent-encoded wildcards and
commas in the query, which are sent decoded (L{normalize_query}).
Status codes and error bodies of the upstream pass through (a 404 stays
a 404, a 406 a 406).

I{Which URLs are the upstream's.}  The upstream names itself by
  - C{base_url} (without its trailing slash) and the configured
    C{upstream_base_urls};
  - the base it builds from the request headers, the way Orthanc's
    DICOMweb plugin does: C{{proto}://{host}{root}}, where C{root} is the
    path of C{base_url}, C{host} the C{host} of the first element of the
    C{Forwarded} header Harmony sends (taken verbatim: Orthanc 1.7 keeps
    the quotes, C{http://"gw:8080"/dicom-web}), or C{X-Forwarded-Host}
    (later Orthanc versions), or the client's C{Host}, or the host and
    port Harmony connected to; C{proto} is C{http} or C{https} (both are
    matched: a server may be configured to claim HTTPS).
The replacement is Harmony's public base for the endpoint: the request's
C{base_url} (C{[proxy] public_base_url}, else the trusted C{Forwarded}
headers, else C{Host}) plus the endpoint prefix.  A target equal to it is
not rewritten; with no public base nothing is.

I{Headers.}  C{Location} and C{Content-Location} values starting with a
target followed by C{/}, C{?} or nothing are rewritten.

I{Bodies.}  Responses of type C{application/dicom+json},
C{application/json}, C{application/dicom+xml}, and C{multipart/related}
whose C{type} parameter is C{application/dicom+xml} (QIDO-RS results,
metadata, STOW-RS responses) are rewritten while they stream: every target
that starts a JSON string or an XML attribute or text (preceded by C{"},
C{'} or C{>}) and is followed by C{/}, C{?}, C{"}, C{'}, C{<} or an
escaped slash is replaced.  Each target is looked for as written raw, in
JSON escaping (C{"} as C{\\"}, and C{/} either as C{/} or as C{\\/}) and
in XML escaping (C{"} as C{&quot;}), and replaced by the public base in
the same spelling.  The rewriting keeps only a few bytes of carry-over
(the longest spelling plus three bytes of context) between chunks, so a
target split across chunks is still found and memory stays bounded; the
rewritten stream applies backpressure to the upstream connection and
cancelling it cancels the upstream body.  A rewritten streamed body loses
its C{Content-Length} (the length changes); a small body read whole is
rewritten in memory and its C{Content-Length} corrected.  Everything else
(instances, frames, bulk data, rendered images) streams through
untouched, byte for byte, with its C{Content-Length}.
"""

import json
import re
from urllib.parse import urlsplit

import attr

from harmony.backends.http import OPTIONS as HTTP_OPTIONS
from harmony.backends.http import HttpBackend, _check_base_url, forwarded_headers
from harmony.config.schema import Field, ListOf, Str
from harmony.envelope import media_type
from harmony.streams import Stream, relay

OPTIONS = HTTP_OPTIONS.extend(
    {
        "upstream_base_urls": Field(
            ListOf(Str(nonempty=True, check=_check_base_url)),
            (),
            "other base URLs the upstream uses for itself in links (rewritten like base_url)",
        ),
    }
)

#: Response media types whose bodies may hold upstream URLs.
REWRITTEN_TYPES = frozenset({"application/dicom+json", "application/json", "application/dicom+xml"})
#: C{multipart/related} responses with one of these C{type} parameters are rewritten too.
REWRITTEN_MULTIPART_TYPES = frozenset({"application/dicom+xml"})

_NO_BODY = frozenset({204, 304})

#: Percent-encoded characters of QIDO matching values that are sent
#: decoded: clients encode the wildcards (dicomweb-client sends
#: C{PatientName=DOE%2A}) and some servers (Orthanc 1.10) then match a
#: literal C{%2A}.  Query structure (C{&}, C{=}, C{+}, C{%}, C{#}) stays
#: encoded.
_QUERY_SAFE = re.compile(r"%(2[AaCcDdEeFf]|3[AaFf]|5[Ee]|5[Ff]|7[Ee]|3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa])")


def normalize_query(query):
    """
    C{query} with the percent-encodings of wildcards, commas, carets and
    other characters that mean the same decoded turned into the characters.
    """
    if "%" not in query:
        return query
    return _QUERY_SAFE.sub(lambda m: chr(int(m.group(1), 16)), query)


def _type_parameter(content_type):
    for item in content_type.split(";")[1:]:
        name, _, value = item.partition("=")
        if name.strip().lower() == "type":
            return value.strip().strip('"').strip().lower()
    return ""


def rewritable(content_type):
    """
    C{True} when a response body of this C{Content-Type} can carry
    upstream URLs that Harmony rewrites (DICOM JSON, JSON, DICOM XML, and
    C{multipart/related} of DICOM XML).
    """
    mtype = media_type(content_type)
    if mtype in REWRITTEN_TYPES:
        return True
    return mtype == "multipart/related" and _type_parameter(content_type) in REWRITTEN_MULTIPART_TYPES


def _spellings(text):
    """
    The ways C{text} can be written in a DICOM JSON or XML body: raw, JSON
    escaped (with C{/} as is and as C{\\/}), XML escaped.
    """
    escaped = json.dumps(text, ensure_ascii=False)[1:-1]
    xml = text.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;").replace("'", "&apos;")
    return (text, escaped, escaped.replace("/", "\\/"), xml)


def _first_element_params(value):
    """
    The parameters of the first element of a C{Forwarded} value, values
    verbatim (quotes kept), names in lower case.
    """
    params = {}
    for pair in value.split(",", 1)[0].split(";"):
        name, sep, val = pair.partition("=")
        if sep:
            params[name.strip().lower()] = val.strip()
    return params


def upstream_bases(base_url, aliases, outgoing_headers):
    """
    The base URLs an upstream DICOMweb server may use for itself in an
    answer to a request sent to C{base_url} with C{outgoing_headers}.

    @param base_url: the upstream base the request went to.
    @param aliases: the configured C{upstream_base_urls}.
    @param outgoing_headers: the C{(name, value)} byte pairs Harmony sent
        (L{forwarded_headers}), plus the client's C{Host}.
    @return: a set of base URLs without trailing slash.
    """
    base = base_url.rstrip("/")
    parts = urlsplit(base)
    root = parts.path.rstrip("/")
    hosts = {parts.netloc}
    forwarded = xfh = None
    for name, value in outgoing_headers:
        lname = name.lower()
        if lname == b"forwarded" and forwarded is None:
            forwarded = value.decode("latin-1")
        elif lname == b"x-forwarded-host" and xfh is None:
            xfh = value.decode("latin-1")
        elif lname == b"host":
            hosts.add(value.decode("latin-1").strip())
    if forwarded:
        host = _first_element_params(forwarded).get("host", "")
        hosts.update({host, host.strip('"')})
    if xfh:
        hosts.update({xfh.strip(), xfh.split(",", 1)[0].strip()})
    targets = {base} | {a.rstrip("/") for a in aliases if a}
    targets.update(f"{scheme}://{host}{root}" for host in hosts if host for scheme in ("http", "https"))
    return targets


class UrlRewriter:
    """
    Replaces upstream base URLs by the public base in headers and, chunk by
    chunk, in DICOM JSON/XML bodies (sans-IO: L{feed} and L{flush}).

    @param upstream: the upstream base URLs (L{upstream_bases}).
    @param public: Harmony's public base for the endpoint.
    """

    #: (upstream bases, public base) -> (upstream, replacements, pattern,
    #: hold): what a rewriter needs, built once per combination (~45 us:
    #: every spelling of every base, and a regular expression of them).
    _tables = {}

    def __init__(self, upstream, public):
        self.public = public.rstrip("/")
        self._carry = b""
        key = (frozenset(upstream), self.public)
        table = self._tables.get(key)
        if table is None:
            table = self._table(upstream, self.public)
            if len(self._tables) >= 256:
                self._tables.clear()
            self._tables[key] = table
        self.upstream, self._replacements, self._pattern, self._hold = table

    @staticmethod
    def _table(upstream, public):
        # Longest first: a base that extends another wins.
        upstream = sorted({u.rstrip("/") for u in upstream if u} - {public}, key=len, reverse=True)
        if not (public and upstream):
            return upstream, {}, None, 0
        replacements = {}
        for target in upstream:
            for spelling, replacement in zip(_spellings(target), _spellings(public)):
                replacements.setdefault(spelling.encode("utf-8"), replacement.encode("utf-8"))
        needles = sorted(replacements, key=len, reverse=True)
        pattern = re.compile(rb"([\"'>])(" + b"|".join(re.escape(n) for n in needles) + rb")(?=[/?\"'<]|\\/)")
        # Bytes a match can span from its context character to the end of
        # its look-ahead: what must be held back until more data arrives.
        return upstream, replacements, pattern, len(needles[0]) + 3

    @property
    def active(self):
        """
        C{True} when there is something to rewrite to and from.
        """
        return bool(self.public and self.upstream)

    def url(self, value):
        """
        C{value} (a header value) with a leading upstream base replaced.
        """
        for up in self.upstream:
            if value == up or value.startswith(up + "/") or value.startswith(up + "?"):
                return self.public + value[len(up) :]
        return value

    def _replace(self, match):
        return match.group(1) + self._replacements[match.group(2)]

    def feed(self, chunk):
        """
        Rewrite the next chunk of a body.

        @return: the bytes that can be passed on now (maybe empty); up to
            the longest spelling plus three bytes stay behind until the
            next chunk or L{flush}.
        """
        data = self._carry + chunk if self._carry else bytes(chunk)
        cut = len(data) - self._hold
        if cut <= 0:
            self._carry = data
            return b""
        out = []
        last = 0
        for match in self._pattern.finditer(data):
            if match.start() >= cut:
                break
            out.append(data[last : match.start()])
            out.append(self._replace(match))
            last = match.end()
        cut = max(cut, last)
        out.append(data[last:cut])
        self._carry = data[cut:]
        return b"".join(out)

    def flush(self):
        """
        The rest of the body (the end of a body ends no URL).
        """
        data, self._carry = self._carry, b""
        return self._pattern.sub(self._replace, data) if data else b""

    def rewrite_bytes(self, data):
        """
        A whole body in memory, rewritten.
        """
        return self._pattern.sub(self._replace, data)

    def rewrite_stream(self, source):
        """
        A L{Stream} of C{source} rewritten chunk by chunk, with backpressure
        (the upstream is read only while the output has room); cancelling
        it cancels C{source}; an error of C{source} reaches its consumer.
        """
        return relay(source, transform=self.feed, tail=self.flush)


class DicomwebBackend(HttpBackend):
    """
    Proxies DICOMweb requests to C{options.base_url}, rewriting the
    upstream's URLs in its answers to Harmony's.
    """

    service_type = "dicomweb"

    def __init__(self, name, options, context):
        super().__init__(name, options, context)
        self._aliases = tuple(u.rstrip("/") for u in options.upstream_base_urls)

    def url(self, envelope):
        """
        The upstream URL, its query normalised by L{normalize_query}.
        """
        url = super().url(envelope)
        path, sep, query = url.partition("?")
        return path + sep + normalize_query(query) if sep else url

    def handle(self, envelope):
        details = envelope.details
        if "accept-encoding" in details.headers:
            # A compressed answer could not have its URLs rewritten: ask
            # the upstream for identity (the client still gets the bytes).
            headers = details.headers.copy()
            headers.set("Accept-Encoding", "identity")
            envelope = attr.evolve(envelope, details=attr.evolve(details, headers=headers))
        d = super().handle(envelope)
        return d.addCallback(self._rewrite, envelope)

    def rewriter(self, envelope):
        """
        The L{UrlRewriter} from the upstream's bases to Harmony's public
        base for this request.
        """
        details = envelope.details
        prefix = details.prefix.rstrip("/") if details.prefix not in ("", "/") else ""
        public = details.base_url.rstrip("/") + prefix if details.base_url else ""
        upstream = envelope.target.get("base_url") or self._base
        sent = forwarded_headers(details)
        host = details.headers.get("host")
        if host:
            sent.append((b"Host", host.encode("latin-1")))
        return UrlRewriter(upstream_bases(upstream, self._aliases, sent), public)

    def _rewrite(self, response, envelope):
        body_links = rewritable(response.content_type)
        if not body_links and "location" not in response.headers and "content-location" not in response.headers:
            # Instances, frames, bulk data: nothing to look at.
            return response
        rewriter = self.rewriter(envelope)
        if not rewriter.active:
            return response
        for name in ("Location", "Content-Location"):
            value = response.headers.get(name)
            if value is not None:
                new = rewriter.url(value)
                if new != value:
                    response.headers.set(name, new)
        if not body_links:
            return response
        if envelope.details.method == "HEAD" or response.status in _NO_BODY:
            # The entity a GET would send is rewritten, so its length is unknown.
            if envelope.details.method == "HEAD":
                response.headers.remove("Content-Length")
            return response
        body = response.body
        if isinstance(body, Stream):
            response.body = rewriter.rewrite_stream(body)
            response.headers.remove("Content-Length")
        elif body:
            new = rewriter.rewrite_bytes(bytes(body))
            if new != body:
                response.body = new
                if "content-length" in response.headers:
                    response.headers.set("Content-Length", str(len(new)))
        return response
