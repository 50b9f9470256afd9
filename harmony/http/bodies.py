# -*- test-case-name: tests.unit.test_bodies -*-
"""
Body parsers: the normalized (parsed) view of a request or response body
by Content-Type, under C{[proxy.content_limits]}.

Each parser is sans-IO: C{feed(chunk)} as bytes arrive, C{close()} for the
view.  L{parse} drives one over a body (C{bytes} or a L{Stream}), enforcing
the limits while it reads, and hands back the body to pass on, byte for
byte the one received (a streamed body is read once and replaced by a
fresh stream over the same bytes).

Normalized views by media type (parameters such as C{charset} ignored
unless said otherwise; an empty body has no view, C{None}, for every type):

  - JSON (C{application/json}, C{application/fhir+json},
    C{application/dicom+json}, any C{+json}, and no Content-Type): the JSON
    value.  A whitespace-only body has no view.
  - XML (C{application/xml}, C{text/xml}, C{application/soap+xml}, any
    C{+xml}): parsed with defusedxml; a document type declaration (so
    every DTD, internal or external, entity declaration, external or
    parameter entity and entity-expansion bomb) is refused with 400.
    C{{root_name: value}} where an element's value is
      - its text (a C{str}) when it has neither attributes nor child
        elements, or C{None} when it is empty;
      - else an object: C{"@name"} for each attribute, the child element
        names (a name seen more than once in the element holds an array of
        values, in document order; once: the value itself), and
        C{"#text"} for its text when there is any.
    Text is trimmed of surrounding whitespace; whitespace-only text, comments
    and processing instructions are dropped; every value is a string.
    Namespaces: names are kept as written in the document, prefix included
    (C{"soap:Envelope"}), and namespace declarations are kept as the
    attributes they are (C{"@xmlns"}, C{"@xmlns:soap"}), so the view maps
    back to the same XML and a consumer can resolve prefixes if it needs to.
    Nesting deeper than C{max_xml_depth} elements (the root is level 1) is
    a 400.
  - CSV (C{text/csv}; the C{charset} parameter is honoured, default
    UTF-8 with an optional BOM): a list of objects, one per record after
    the header record, header name -> value (missing trailing values are
    C{None}; more values than header columns, a repeated header name or an
    unterminated quote are 400s; blank lines are skipped).  Against formula
    (CSV) injection, as OWASP recommends, every header name and value that
    starts with C{=}, C{+}, C{-}, C{@}, a tab or a carriage return is
    prefixed with a single quote (C{"=SUM(A1)"} -> C{"'=SUM(A1)"},
    C{"-5"} -> C{"'-5"}): a spreadsheet shows it as text instead of running
    it.  More than C{max_csv_rows} records (header excluded) is a 400.
  - Form (C{application/x-www-form-urlencoded}, UTF-8): name -> value;
    C{a[]=1&a[]=2} -> C{{"a": ["1", "2"]}}; a name repeated without C{[]}
    also collects an array (nothing is dropped).  More than
    C{max_form_fields} fields is a 400.
  - Multipart (C{multipart/form-data}; streamed):
    C{{"fields": {name: value}, "files": [{"name", "filename",
    "content_type", "size", "sha256"}]}}.  A part with a C{filename} is a
    file: only its metadata is kept (C{content_type} is the part's media
    type or C{None}, C{sha256} the hex digest of its content); other parts
    are fields, with the form rules for names.  More than
    C{max_multipart_files} files or C{max_form_fields} fields is a 400.
  - Binary (C{image/*}, C{video/*}, C{audio/*} -- C{image/svg+xml}
    included --, C{application/pdf}, C{application/octet-stream},
    C{application/dicom}): C{{"content_type", "size", "sha256"}} computed
    while streaming.
  - Anything else: no view (C{None}); the body is not read.

Malformed bodies are L{BadRequest}s naming the problem; a body longer than
C{max_body_size} is L{PayloadTooLarge}, raised as soon as the bytes read
(or the announced length) pass the limit.
"""

import codecs
import csv
import hashlib
import io
import json
import tempfile
from urllib.parse import unquote_to_bytes
from xml.sax import SAXParseException
from xml.sax.handler import ContentHandler

import attr
from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.expatreader import DefusedExpatParser
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from twisted.internet import defer

from harmony.errors import BadRequest, PayloadTooLarge
from harmony.streams import Stream

# -- limits ---------------------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class ContentLimits:
    """
    The C{[proxy.content_limits]} in force for a body (defaults as in the
    config schema).  C{max_body_size} may be C{None}: no size limit.
    """

    max_body_size = attr.ib(default=10 * 1024 * 1024)
    max_csv_rows = attr.ib(default=10000)
    max_xml_depth = attr.ib(default=100)
    max_multipart_files = attr.ib(default=10)
    max_form_fields = attr.ib(default=1000)

    @classmethod
    def from_options(cls, options=None, max_body_size=None):
        """
        Limits from validated C{[proxy.content_limits]} options (a mapping;
        C{None}: the defaults), with an optional C{max_body_size} override
        (an endpoint's own limit).
        """
        values = {k: v for k, v in dict(options or {}).items() if k in attr.fields_dict(cls)}
        if max_body_size is not None:
            values["max_body_size"] = max_body_size
        return cls(**values)

    def with_max_body_size(self, max_body_size):
        """
        These limits with another C{max_body_size}.
        """
        return attr.evolve(self, max_body_size=max_body_size)


#: The defaults of C{[proxy.content_limits]}.
DEFAULT_LIMITS = ContentLimits()

# -- media types ----------------------------------------------------------------------

JSON = "json"
XML = "xml"
CSV = "csv"
FORM = "form"
MULTIPART = "multipart"
BINARY = "binary"

JSON_TYPES = frozenset({"application/json", "application/fhir+json", "application/dicom+json"})
XML_TYPES = frozenset({"application/xml", "text/xml", "application/soap+xml"})
BINARY_TYPES = frozenset({"application/pdf", "application/octet-stream", "application/dicom"})
BINARY_PREFIXES = ("image/", "video/", "audio/")


def media_type(content_type):
    """
    The lower-case media type of a Content-Type value, without parameters.
    """
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def body_format(content_type):
    """
    Which parser a Content-Type gets: L{JSON}, L{XML}, L{CSV}, L{FORM},
    L{MULTIPART}, L{BINARY}, or C{None} (no parsed view).
    """
    mtype = media_type(content_type)
    if not mtype or mtype in JSON_TYPES or mtype.endswith("+json"):
        return JSON
    if mtype.startswith(BINARY_PREFIXES) or mtype in BINARY_TYPES:
        return BINARY
    if mtype in XML_TYPES or mtype.endswith("+xml"):
        return XML
    if mtype == "text/csv":
        return CSV
    if mtype == "application/x-www-form-urlencoded":
        return FORM
    if mtype == "multipart/form-data":
        return MULTIPART
    return None


def make_parser(content_type, limits=DEFAULT_LIMITS):
    """
    The sans-IO parser for a Content-Type, or C{None} when the type has no
    parsed view.  A parser has C{feed(chunk)} and C{close()} (the view);
    both raise L{BadRequest} for malformed bodies and limits other than
    the size (the size is the caller's: see L{parse}).
    """
    kind = body_format(content_type)
    if kind is None:
        return None
    if kind == JSON:
        return JsonParser()
    if kind == BINARY:
        return BinaryParser(media_type(content_type))
    if kind == XML:
        return XmlParser(limits.max_xml_depth)
    _, params = parse_options_header(content_type)
    if kind == CSV:
        return CsvParser(limits.max_csv_rows, params.get("charset"))
    if kind == FORM:
        return FormParser(limits.max_form_fields)
    return MultipartFormParser(params.get("boundary"), limits.max_multipart_files, limits.max_form_fields)


def _add_field(fields, name, value):
    """
    Add a form field: C{a[]} names always collect an array under C{a}; a
    repeated plain name turns into an array.
    """
    if name.endswith("[]"):
        name = name[:-2]
        current = fields.get(name)
        if isinstance(current, list):
            current.append(value)
        elif name in fields:
            fields[name] = [current, value]
        else:
            fields[name] = [value]
        return
    if name in fields:
        current = fields[name]
        if isinstance(current, list):
            current.append(value)
        else:
            fields[name] = [current, value]
    else:
        fields[name] = value


# -- JSON -----------------------------------------------------------------------------


class JsonParser:
    """
    JSON: the body is gathered (it is bounded by C{max_body_size}) and
    decoded at the end; the standard library has no incremental decoder.
    """

    def __init__(self):
        self._chunks = []
        #: The whole body, once L{close} has run.
        self.data = None

    def feed(self, chunk):
        self._chunks.append(chunk)

    def close(self):
        data = self.data = b"".join(self._chunks)
        self._chunks = []
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise BadRequest(f"Malformed JSON body: {e.msg} at line {e.lineno} column {e.colno}")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("Malformed JSON body: body is not valid UTF-8")
        except RecursionError:
            raise BadRequest("Malformed JSON body: nested too deeply")


# -- binary ---------------------------------------------------------------------------


class BinaryParser:
    """
    Opaque media: size and SHA-256 while the bytes go by.
    """

    def __init__(self, content_type):
        self._content_type = content_type
        self._hash = hashlib.sha256()
        self._size = 0

    def feed(self, chunk):
        self._hash.update(chunk)
        self._size += len(chunk)

    def close(self):
        if not self._size:
            return None
        return {"content_type": self._content_type, "size": self._size, "sha256": self._hash.hexdigest()}


# -- XML ------------------------------------------------------------------------------


class _XmlTooDeep(Exception):
    pass


class _XmlToJson(ContentHandler):
    """
    SAX events -> the JSON view (see the module docstring).
    """

    def __init__(self, max_depth):
        ContentHandler.__init__(self)
        self.max_depth = max_depth
        # One frame per open element: (name, attributes and children,
        # text parts, names of the children seen more than once).
        self.stack = []
        self.result = None

    def startElement(self, name, attrs):
        if len(self.stack) >= self.max_depth:
            raise _XmlTooDeep()
        self.stack.append((name, {"@" + k: v for k, v in attrs.items()}, [], set()))

    def characters(self, content):
        if self.stack:
            self.stack[-1][2].append(content)

    def endElement(self, name):
        name, members, texts, _ = self.stack.pop()
        text = "".join(texts).strip()
        if members:
            if text:
                members["#text"] = text
            value = members
        else:
            value = text or None
        if not self.stack:
            self.result = {name: value}
            return
        _, parent, _, repeated = self.stack[-1]
        if name in repeated:
            parent[name].append(value)
        elif name in parent:
            parent[name] = [parent[name], value]
            repeated.add(name)
        else:
            parent[name] = value


class XmlParser:
    """
    XML, parsed incrementally by expat through defusedxml, with DTDs
    refused outright (no healthcare XML format needs one, SOAP 1.2 forbids
    them) and the nesting depth bounded while parsing.
    """

    def __init__(self, max_depth):
        self._max_depth = max_depth
        self._handler = _XmlToJson(max_depth)
        self._parser = DefusedExpatParser(forbid_dtd=True, forbid_entities=True, forbid_external=True)
        self._parser.setContentHandler(self._handler)
        self._started = False
        self._blank = []

    def feed(self, chunk):
        if not self._started:
            if not chunk.strip():
                # Only whitespace so far: a blank body has no view.
                self._blank.append(chunk)
                return
            self._started = True
            chunk = b"".join(self._blank) + chunk
            self._blank = []
        self._run(self._parser.feed, chunk)

    def close(self):
        if not self._started:
            return None
        self._run(self._parser.close)
        return self._handler.result

    def _run(self, fn, *args):
        try:
            fn(*args)
        except _XmlTooDeep:
            raise BadRequest(f"XML nested deeper than {self._max_depth} levels")
        except DTDForbidden:
            raise BadRequest("XML body has a document type declaration (DTD); DTDs are not accepted")
        except EntitiesForbidden:
            raise BadRequest("XML body declares entities; entity declarations are not accepted")
        except ExternalReferenceForbidden:
            raise BadRequest("XML body references an external entity; external references are not accepted")
        except SAXParseException as e:
            raise BadRequest(
                f"Malformed XML body: {e.getMessage()} at line {e.getLineNumber()} column {e.getColumnNumber()}"
            )


# -- CSV ------------------------------------------------------------------------------

#: First characters that make a spreadsheet evaluate a cell (OWASP CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def escape_formula(value):
    """
    C{value} with a single quote in front when it starts like a formula.
    """
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


class CsvParser:
    """
    CSV (RFC 4180, as the C{csv} module reads it, strictly), parsed record
    by record as lines arrive, so C{max_csv_rows} stops a long body early.

    Complete records are found by a cheap hint -- the text up to the last
    newline has an even number of quote characters -- and confirmed by the
    C{csv} reader: a quoted field still open at the end of the text goes
    back to the pending text instead of being cut.
    """

    def __init__(self, max_rows, charset=None):
        self._max_rows = max_rows
        codec = (charset or "utf-8").strip().lower()
        try:
            info = codecs.lookup(codec)
        except LookupError:
            raise BadRequest("CSV body has an unknown charset")
        self._charset = info.name
        if info.name == "utf-8":
            info = codecs.lookup("utf-8-sig")
        self._decoder = info.incrementaldecoder("strict")
        self._pending = []
        self._odd_quotes = False
        self._header = None
        self._rows = []

    def feed(self, chunk):
        text = self._decode(chunk)
        nl = text.rfind("\n")
        if nl < 0:
            self._keep(text)
            return
        head, tail = text[: nl + 1], text[nl + 1 :]
        if self._odd_quotes ^ bool(head.count('"') & 1):
            # A quoted field is still open at the last newline.
            self._keep(text)
            return
        block = "".join(self._pending) + head
        self._pending = []
        self._odd_quotes = False
        rest = self._records(block, final=False)
        if rest:
            self._keep(rest)
        self._keep(tail)

    def close(self):
        text = self._decode(b"", final=True)
        block = "".join(self._pending) + text
        self._pending = []
        self._records(block, final=True)
        if self._header is None:
            return None
        return self._rows

    def _keep(self, text):
        if text:
            self._pending.append(text)
            self._odd_quotes ^= bool(text.count('"') & 1)

    def _decode(self, data, final=False):
        try:
            return self._decoder.decode(data, final)
        except UnicodeDecodeError:
            raise BadRequest(f"CSV body is not valid {self._charset}")

    def _records(self, block, final):
        """
        Parse the complete records of C{block}; return the text of an
        unfinished last record (not final) or raise.
        """
        # Lines as a file opened with newline="" gives them to csv.
        lines = list(io.StringIO(block, newline=""))
        reader = csv.reader(lines, strict=True)
        done = 0
        try:
            for row in reader:
                done = reader.line_num
                self._row(row)
        except csv.Error as e:
            if not final and str(e) == "unexpected end of data":
                return "".join(lines[done:])
            near = len(self._rows) + (self._header is not None) + 1
            if str(e) == "unexpected end of data":
                raise BadRequest(f"Malformed CSV body: unterminated quoted field in record {near}")
            raise BadRequest(f"Malformed CSV body: {e} in record {near}")
        return ""

    def _row(self, row):
        if not row:
            return
        row = [escape_formula(v) for v in row]
        header = self._header
        if header is None:
            if len(set(row)) != len(row):
                seen = set()
                for name in row:
                    if name in seen:
                        raise BadRequest(f"CSV header repeats the column {name!r}")
                    seen.add(name)
            self._header = row
            return
        if len(self._rows) >= self._max_rows:
            raise BadRequest(f"CSV body has more than {self._max_rows} rows")
        if len(row) > len(header):
            raise BadRequest(
                f"CSV row {len(self._rows) + 1} has {len(row)} values but the header has {len(header)} columns"
            )
        record = dict(zip(header, row))
        for name in header[len(row) :]:
            record[name] = None
        self._rows.append(record)


# -- form -----------------------------------------------------------------------------


class FormParser:
    """
    C{application/x-www-form-urlencoded}, field by field as C{&}s arrive.
    """

    def __init__(self, max_fields):
        self._max_fields = max_fields
        self._pending = []
        self._count = 0
        self._fields = {}
        self._seen = False

    def feed(self, chunk):
        if not chunk:
            return
        self._seen = True
        if b"&" not in chunk:
            self._pending.append(chunk)
            return
        self._pending.append(chunk)
        *complete, last = b"".join(self._pending).split(b"&")
        self._pending = [last]
        for pair in complete:
            self._pair(pair)

    def close(self):
        pending, self._pending = b"".join(self._pending), []
        self._pair(pending)
        if not self._seen:
            return None
        return self._fields

    def _pair(self, pair):
        if not pair.strip():
            return
        self._count += 1
        if self._count > self._max_fields:
            raise BadRequest(f"Form body has more than {self._max_fields} fields")
        name, _, value = pair.partition(b"=")
        try:
            name = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8")
            value = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("Form body is not valid UTF-8")
        _add_field(self._fields, name, value)


# -- multipart ------------------------------------------------------------------------


class MultipartFormParser:
    """
    C{multipart/form-data}, parsed as the bytes arrive.

    Framing is the C{multipart} package's L{PushMultipartParser} (already
    installed as a dependency of treq): a sans-IO push parser that keeps
    nothing but a boundary-sized tail between chunks, hardened against the
    usual traps (header size and count limits, partial boundaries across
    chunks, premature end), which a hand-written parser would have to
    re-prove.  File parts are hashed as they go by and dropped; only field
    values are kept (bounded by C{max_body_size}).
    """

    def __init__(self, boundary, max_files, max_fields):
        if not boundary:
            raise BadRequest("multipart/form-data body without a boundary parameter")
        self._max_files = max_files
        self._max_fields = max_fields
        try:
            self._parser = PushMultipartParser(boundary, max_segment_count=max_files + max_fields + 1)
        except MultipartError as e:
            raise BadRequest(f"Malformed multipart body: {_reason(e)}")
        self._fields = {}
        self._files = []
        self._field_count = 0
        self._part = None
        self._seen = False

    def feed(self, chunk):
        if not chunk:
            return
        self._seen = True
        try:
            for event in self._parser.parse(chunk):
                if isinstance(event, MultipartSegment):
                    self._start(event)
                elif event is None:
                    self._end()
                else:
                    self._part[1](event)
        except MultipartError as e:
            raise BadRequest(f"Malformed multipart body: {_reason(e)}")

    def close(self):
        if not self._seen:
            return None
        try:
            self._parser.close()
        except MultipartError:
            if self._field_count + len(self._files) == 0 and self._part is None:
                raise BadRequest("Malformed multipart body: the boundary of its Content-Type was not found")
            raise BadRequest("Malformed multipart body: it ends before its closing boundary")
        return {"fields": self._fields, "files": self._files}

    def _start(self, segment):
        if segment.filename is not None:
            if len(self._files) >= self._max_files:
                raise BadRequest(f"Multipart body has more than {self._max_files} files")
            digest = hashlib.sha256()
            self._part = (segment, digest.update, digest)
        else:
            self._field_count += 1
            if self._field_count > self._max_fields:
                raise BadRequest(f"Multipart body has more than {self._max_fields} fields")
            chunks = []
            self._part = (segment, chunks.append, chunks)

    def _end(self):
        segment, _, state = self._part
        self._part = None
        if segment.filename is not None:
            self._files.append(
                {
                    "name": segment.name,
                    "filename": segment.filename,
                    "content_type": segment.content_type,
                    "size": segment.size,
                    "sha256": state.hexdigest(),
                }
            )
            return
        charset = segment.charset or "utf-8"
        try:
            value = b"".join(state).decode(charset)
        except (UnicodeDecodeError, LookupError):
            raise BadRequest(f"Multipart field {segment.name!r} is not valid {charset}")
        _add_field(self._fields, segment.name, value)


def _reason(error):
    """
    The first argument of a C{multipart} error (its message).
    """
    return error.args[0] if error.args else type(error).__name__


# -- driving a parser over a body -------------------------------------------------------

#: Streamed bodies of the spooled kinds (binary, multipart) without a
#: rewind of their own are copied to a temporary file past this size.
SPOOL_MEMORY = 1024 * 1024


@attr.s(frozen=True, slots=True)
class ParsedBody:
    """
    What L{parse} returns.

    @ivar normalized: the parsed view (C{None}: none).
    @ivar body: the body to pass on: the same bytes, the same unread
        stream (no parser), or a fresh stream over the bytes read.
    @ivar rewind: when C{body} is a stream Harmony spooled: a callable
        returning another fresh stream over the same bytes; else C{None}.
    """

    normalized = attr.ib()
    body = attr.ib()
    rewind = attr.ib(default=None)


class _Spool:
    """
    A replayable copy of a streamed body: memory first, then a temporary
    file (small sequential writes into the page cache, like twisted.web's
    own spooling of request bodies).
    """

    def __init__(self):
        self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        self._size = 0

    def write(self, chunk):
        self._file.write(chunk)
        self._size += len(chunk)

    def stream(self):
        self._file.seek(0)
        return Stream.from_file(self._file, length=self._size, close=False)


def _too_large(label, limit):
    return PayloadTooLarge(f"{label} larger than the limit of {limit} bytes")


def parse_bytes(data, content_type, limits=DEFAULT_LIMITS, label="Request body"):
    """
    The normalized view of a body already in memory.

    @raise BadRequest: malformed body, or a limit other than the size.
    @raise PayloadTooLarge: longer than C{limits.max_body_size}.
    """
    parser = make_parser(content_type, limits)
    if parser is None:
        return None
    return _parse_in_memory(parser, data, limits, label)


def _parse_in_memory(parser, data, limits, label):
    data = b"" if data is None else bytes(data)
    if limits.max_body_size is not None and len(data) > limits.max_body_size:
        raise _too_large(label, limits.max_body_size)
    if data:
        parser.feed(data)
    return parser.close()


def parse(body, content_type, limits=DEFAULT_LIMITS, rewind=None, label="Request body"):
    """
    Parse a body (C{bytes}, a L{Stream} or C{None}) by its Content-Type.

    A stream is read chunk by chunk through the parser and then replaced:
    by C{rewind()} when given (the HTTP adapter's rewind over its spool
    file), else by the bytes read (JSON, XML, CSV, form: bounded by
    C{max_body_size}) or a stream over a spooled copy (binary,
    multipart).  On an error the stream is cancelled.

    @param rewind: C{None}, or a callable returning a fresh stream of the
        same body.
    @param label: how size errors name the body (C{"Request body"}).
    @return: Deferred[L{ParsedBody}], failing with L{BadRequest} or
        L{PayloadTooLarge}.
    """
    try:
        parser = make_parser(content_type, limits)
        if parser is None:
            return defer.succeed(ParsedBody(None, body))
        if not isinstance(body, Stream):
            return defer.succeed(ParsedBody(_parse_in_memory(parser, body, limits, label), body))
    except Exception:
        return defer.fail()
    return defer.Deferred.fromCoroutine(_parse_stream(body, parser, limits, rewind, label))


async def _parse_stream(stream, parser, limits, rewind, label):
    limit = limits.max_body_size
    if limit is not None and stream.length is not None and stream.length > limit:
        stream.cancel()
        raise _too_large(label, limit)
    if rewind is not None or isinstance(parser, JsonParser):
        keep = None
    elif isinstance(parser, (BinaryParser, MultipartFormParser)):
        keep = _Spool()
    else:
        keep = []
    size = 0
    try:
        async for chunk in stream:
            size += len(chunk)
            if limit is not None and size > limit:
                raise _too_large(label, limit)
            parser.feed(chunk)
            if keep is None:
                continue
            if isinstance(keep, list):
                keep.append(chunk)
            else:
                keep.write(chunk)
    except BaseException:
        stream.cancel()
        raise
    normalized = parser.close()
    if rewind is not None:
        return ParsedBody(normalized, rewind())
    if keep is None:
        return ParsedBody(normalized, parser.data)
    if isinstance(keep, list):
        return ParsedBody(normalized, b"".join(keep))
    return ParsedBody(normalized, keep.stream(), keep.stream)
