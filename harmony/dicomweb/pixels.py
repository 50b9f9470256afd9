# -*- test-case-name: tests.unit.test_dicomweb_pixels -*-
"""
Pixel data for WADO-RS: frames, rendered images and thumbnails (PS3.18
sections 8.3.5, 9.4, 10.4).

Every function here is synchronous and can take long (decoding, image
encoding): callers run them in a thread pool, never on the reactor.  The
datasets are those C{pydicom.dcmread} gives for a Part 10 file (the file
meta's Transfer Syntax UID says how the pixel data is encoded).

Frames (L{frames}) are served in one of three ways:

  - B{sliced}: native (uncompressed) pixel data is cut per frame and sent
    as C{application/octet-stream} in Explicit VR Little Endian
    (1.2.840.10008.1.2.1).  Implicit and explicit little endian data are
    byte-identical; big endian data is swapped to little endian (16/32/64
    bit values by value; 8-bit data held in OW by 16-bit word, as PS3.5
    encodes it).  The stored Planar Configuration is kept.  With Bits
    Allocated 1 a frame can start inside a byte: its bits are repacked to
    start at bit 0 of the first byte (pixels in the least significant bit
    first, PS3.5 8.1.1), padded with zero bits to a whole byte;
  - B{as stored}: the fragments of an encapsulated frame, byte for byte,
    with the media type of the stored transfer syntax (C{image/jpeg},
    C{image/jls}, C{image/jp2}, C{image/jpx}, C{image/jphc},
    C{image/dicom-rle}, ...).  Harmony never re-encodes;
  - B{decoded}: an encapsulated frame decoded with pydicom (what its
    installed plugins can decode: RLE always, JPEG baseline/extended 8-bit
    and JPEG 2000 with Pillow) and sent as octet-stream little endian
    bytes, in the decoded array's layout: colour pixels interleaved
    (Planar Configuration 0) and YCbCr converted to RGB (pydicom's
    default); 1-bit frames are packed.  A frame that cannot be decoded is
    a L{NotAcceptable}.

Which one a request gets (L{frames}'s C{media_type}/C{transfer_syntax}):

    media type                  transfer syntax        result
    application/octet-stream    none, 1.2.1 or "*"     sliced or decoded
    application/octet-stream    anything else          406
    */*                         none or "*"            as stored (sliced for native data; decoded for
                                                       an encapsulated syntax without a frame media type)
    */*                         1.2.840.10008.1.2.1    sliced or decoded
    */*                         an encapsulated one    as stored when it is the stored one, else 406
    image/jpeg, image/jls ...   none or "*"            as stored when the stored syntax has that media
                                                       type, else 406
    image/jpeg, image/jls ...   a transfer syntax      as stored when it is the stored one, else 406

Rendered images (L{render}, L{thumbnail}) decode one frame and apply, in
order: the Modality LUT (Rescale Slope/Intercept, from the top level or
the frame's Pixel Value Transformation functional group; or a Modality
LUT Sequence), the VOI (an explicit C{window} wins; then the dataset's
Window Center/Width (first pair; top level or the frame's Frame VOI LUT
functional group) with its VOI LUT Function; then a VOI LUT Sequence;
otherwise the frame's min/max), MONOCHROME1 inversion, all scaled to 8
bits.  Colour images (RGB, YCbCr converted to RGB, PALETTE COLOR through
its palette) are scaled from Bits Stored to 8 bits; a window does not
apply to them.  The output is JPEG (quality 90 unless asked), PNG or GIF
made by Pillow.  C{viewport} fits the image inside C{(width, height)}
keeping its aspect ratio (enlarging too); a thumbnail is the middle frame
fitted inside C{size} x C{size}, never enlarged.

Render parameters (L{parse_render_params}, PS3.18 8.3.5.1):
C{viewport=vw,vh[,sx,sy,sw,sh]} (only vw and vh are honoured; the source
rectangle is validated and ignored; at most 4096 x 4096),
C{quality=1..100}, C{window=center,width[,function]} with function
C{linear} (the default), C{linear-exact} or C{sigmoid} (all three honoured,
PS3.3 C.11.2.1.2).  C{annotation} and C{iccprofile} are accepted and
ignored (no annotations are burnt in; no ICC profile is embedded);
C{accept} and C{charset} are left to content negotiation.  Anything else,
a parameter given twice or a bad value is a L{BadRequest}.
"""

import io
import math
import re

import numpy as np
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID

from harmony.dicomweb.accept import FRAME_MEDIA_TYPES
from harmony.errors import BadRequest, InternalError, NotAcceptable, NotFound

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
OCTET_STREAM = "application/octet-stream"


#: Rendered media types and the Pillow format that writes them.
RENDERED_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}

MAX_FRAME_LIST = 10000
MAX_VIEWPORT = 4096
DEFAULT_QUALITY = 90
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NUMBER = re.compile(r"[0-9]+\Z")
_SIGNED = re.compile(r"-?[0-9]+\Z")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


# -- frame lists and counts ---------------------------------------------------


def parse_frame_list(text):
    """
    The frame numbers of a WADO-RS frame list (C{"1,3,5"}), in the order
    given (repeats kept).

    @param text: the C{{frames}} path segment.
    @return: a list of 1-based frame numbers.
    @raise BadRequest: for an empty list, an empty item, something that is
        not a positive decimal integer, or more than L{MAX_FRAME_LIST}
        numbers.
    """
    items = text.split(",") if text else []
    if not items:
        raise BadRequest("The frame list is empty")
    if len(items) > MAX_FRAME_LIST:
        raise BadRequest(f"The frame list has more than {MAX_FRAME_LIST} frame numbers")
    numbers = []
    for item in items:
        if not _NUMBER.match(item) or len(item) > 9 or int(item) < 1:
            raise BadRequest("Frame numbers are positive integers separated by commas (the first frame is 1)")
        numbers.append(int(item))
    return numbers


def number_of_frames(ds):
    """
    The number of frames of an image (Number of Frames, 1 when absent or
    not a positive integer).
    """
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return max(count, 1)


def transfer_syntax(ds):
    """
    The transfer syntax of a dataset read from a Part 10 file: its file
    meta's, or (without one) the encoding it was read with.

    @rtype: L{pydicom.uid.UID}
    """
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if little is False:
        return UID(EXPLICIT_VR_BIG_ENDIAN)
    if implicit:
        return UID(IMPLICIT_VR_LITTLE_ENDIAN)
    return UID(EXPLICIT_VR_LITTLE_ENDIAN)


# -- frames ---------------------------------------------------------------------


def frames(ds, numbers, media_type, transfer_syntax=None):
    """
    Frames of an instance for WADO-RS (see the module docstring for which
    representation a request gets).

    @param ds: the instance (pydicom C{Dataset} of a Part 10 file).
    @param numbers: 1-based frame numbers (L{parse_frame_list}).
    @param media_type: the media type chosen by content negotiation
        (C{"application/octet-stream"}, C{"*/*"}, C{"image/jpeg"}, ...).
    @param transfer_syntax: the transfer syntax UID asked for, C{"*"} (any)
        or C{None} (not given).
    @return: a list of C{(frame bytes, media type, transfer syntax UID)},
        one per number, in the order asked.
    @raise NotFound: when the instance has no pixel data or a number is
        above its Number of Frames.
    @raise NotAcceptable: when the frames cannot be sent as asked (no
        transcoding; a frame the installed decoders cannot decode).
    """
    keyword = _pixel_keyword(ds)
    count = number_of_frames(ds)
    if not numbers:
        return []
    for number in numbers:
        if number < 1 or number > count:
            raise NotFound(f"Frame {number} does not exist")
    stored = _transfer_syntax(ds)
    way = _way(media_type, transfer_syntax, stored)
    if way == "stored" and stored.is_encapsulated:
        if stored in FRAME_MEDIA_TYPES:
            media = FRAME_MEDIA_TYPES[stored]
            return [(data, media, str(stored)) for data in _encapsulated_frames(ds, numbers, count)]
        way = "uncompressed"
    if stored.is_encapsulated:
        return [(_decoded_frame(ds, stored, number), OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN) for number in numbers]
    data = _little_endian(ds, keyword, stored)
    return [(_native_frame(ds, data, number), OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN) for number in numbers]


def _pixel_keyword(ds):
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds and ds[keyword].value is not None:
            return keyword
    raise NotFound("The instance has no pixel data")


def _transfer_syntax(ds):
    try:
        return transfer_syntax(ds)
    except (AttributeError, TypeError, ValueError):
        return UID(EXPLICIT_VR_LITTLE_ENDIAN)


def _way(media_type, asked, stored):
    """
    C{"stored"} or C{"uncompressed"}: how the frames are sent.

    @raise NotAcceptable: when neither can satisfy the request.
    """
    media = (media_type or "*/*").split(";", 1)[0].strip().lower()
    anything = asked in (None, "", "*")
    stored_media = FRAME_MEDIA_TYPES.get(stored) if stored.is_encapsulated else None
    if media == "*/*":
        if anything:
            return "stored"
        if asked == EXPLICIT_VR_LITTLE_ENDIAN:
            return "uncompressed"
        if asked == stored and stored_media:
            return "stored"
    elif media == OCTET_STREAM:
        if anything or asked == EXPLICIT_VR_LITTLE_ENDIAN:
            return "uncompressed"
    elif stored_media is not None and media == stored_media and (anything or asked == stored):
        return "stored"
    raise NotAcceptable("The frames are not available in the media type and transfer syntax asked for; "
                        "Harmony sends them uncompressed or as stored, without re-encoding")


def _encapsulated_frames(ds, numbers, count):
    """
    The stored bytes of the frames C{numbers} of encapsulated pixel data.
    """
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    wanted = set(numbers)
    last = max(numbers)
    found = {}
    try:
        for number, data in enumerate(generate_frames(ds.PixelData, number_of_frames=count,
                                                      extended_offsets=extended), 1):
            if number in wanted:
                found[number] = data
            if number >= last:
                break
    except (ValueError, TypeError, KeyError) as e:
        raise InternalError("The stored pixel data cannot be read") from e
    for number in numbers:
        if number not in found:
            raise NotFound(f"Frame {number} does not exist")
    return [found[number] for number in numbers]


def _decoded_frame(ds, stored, number):
    """
    The little endian bytes of an encapsulated frame decoded.
    """
    arr, meta = _decode(ds, stored, number)
    if int(meta.get("bits_allocated", ds.get("BitsAllocated", 8)) or 8) == 1:
        return np.packbits(arr.ravel(), bitorder="little").tobytes()
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _decode(ds, stored, number):
    """
    The pixel array of one frame and pydicom's description of it.

    @raise NotAcceptable: when no installed decoder can decode it.
    """
    try:
        decoder = get_decoder(stored)
    except NotImplementedError as e:
        raise NotAcceptable("Harmony cannot decode the stored transfer syntax") from e
    if not decoder.is_available:
        raise NotAcceptable("Harmony has no decoder for the stored transfer syntax")
    try:
        arr, meta = decoder.as_array(ds, index=number - 1)
    except Exception as e:
        raise NotAcceptable("The stored frame cannot be decoded by Harmony") from e
    return arr, meta


def _little_endian(ds, keyword, stored):
    """
    The native pixel data of C{ds} in little endian byte order.
    """
    data = ds[keyword].value
    if stored != EXPLICIT_VR_BIG_ENDIAN:
        return data
    bits = int(ds.get("BitsAllocated") or 8)
    width = bits // 8 if bits > 8 else (2 if ds[keyword].VR == "OW" else 1)
    if width == 1:
        return data
    usable = len(data) - len(data) % width
    return np.frombuffer(data[:usable], dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _native_frame(ds, data, number):
    """
    Frame C{number} cut from little endian native pixel data.
    """
    rows = int(ds.Rows)
    columns = int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    frame_bits = rows * columns * samples * bits
    start = (number - 1) * frame_bits
    if start + frame_bits > len(data) * 8:
        raise NotFound(f"Frame {number} does not exist")
    if frame_bits % 8 == 0 and start % 8 == 0:
        return bytes(data[start // 8:(start + frame_bits) // 8])
    first = start // 8
    chunk = np.frombuffer(data, dtype=np.uint8, count=(start + frame_bits + 7) // 8 - first, offset=first)
    bits_array = np.unpackbits(chunk, bitorder="little")[start % 8:start % 8 + frame_bits]
    return np.packbits(bits_array, bitorder="little").tobytes()


# -- rendered ---------------------------------------------------------------------


def render(ds, media_type="image/jpeg", frame=1, viewport=None, quality=None, window=None):
    """
    One frame rendered as a consumer image (PS3.18 rendered resources).

    @param ds: the instance.
    @param media_type: C{"image/jpeg"}, C{"image/png"} or C{"image/gif"}.
    @param frame: the 1-based frame number.
    @param viewport: C{(width, height)} to fit the image in, or C{None}.
    @param quality: the JPEG quality (1 to 100), or C{None} for 90.
    @param window: C{(center, width)} or C{(center, width, function)}, or
        C{None} to use the dataset's VOI.
    @return: the encoded image.
    @raise NotFound: no pixel data, or no such frame.
    @raise NotAcceptable: a media type other than the three, or a frame
        that cannot be decoded.
    @raise BadRequest: a window with a width <= 0 or an unknown function.
    """
    image = _image(ds, media_type, frame, window)
    if viewport is not None:
        image = _fit(image, viewport[0], viewport[1], enlarge=True)
    return _encode(image, media_type, quality)


def thumbnail(ds, media_type="image/jpeg", size=128):
    """
    The middle frame rendered and fitted inside C{size} x C{size} (never
    enlarged).

    @return: the encoded image.
    @raise NotFound: no pixel data.
    @raise NotAcceptable: as L{render}.
    """
    frame = (number_of_frames(ds) + 1) // 2
    image = _image(ds, media_type, frame, None)
    image = _fit(image, size, size, enlarge=False)
    return _encode(image, media_type, None)


def _media(media_type):
    media = (media_type or "").split(";", 1)[0].strip().lower()
    if media not in RENDERED_FORMATS:
        raise NotAcceptable("Rendered images are available as image/jpeg, image/png or image/gif")
    return media


def _image(ds, media_type, frame, window):
    """
    The 8-bit Pillow image of one frame.
    """
    from PIL import Image

    _media(media_type)
    _pixel_keyword(ds)
    if frame < 1 or frame > number_of_frames(ds):
        raise NotFound(f"Frame {frame} does not exist")
    arr, meta = _decode(ds, _transfer_syntax(ds), frame)
    photometric = meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation") or ""
    photometric = str(getattr(photometric, "value", photometric))
    bits_stored = int(meta.get("bits_stored") or ds.get("BitsStored") or 8)
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise NotAcceptable("The palette of the image cannot be applied") from e
        bits_stored = 8 if arr.dtype.itemsize == 1 else 16
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return Image.fromarray(_scale_color(arr, bits_stored), "RGB")
    values = _modality(ds, arr, frame)
    out = _voi(ds, values, frame, window)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def _scale_color(arr, bits_stored):
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    top = float(2 ** min(max(bits_stored, 1), 32) - 1)
    scaled = np.clip(arr.astype(np.float64), 0, top) * (255.0 / top)
    return np.ascontiguousarray(np.rint(scaled).astype(np.uint8))


def _frame_item(ds, frame, sequence, keyword):
    """
    The first item of C{sequence} inside the shared or the frame's
    functional groups that holds C{keyword}, or C{None}.
    """
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) >= frame:
        groups.insert(0, per_frame[frame - 1])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0]
    return None


def _modality(ds, arr, frame):
    """
    The frame's values through its Modality LUT (rescale), as floats.
    """
    if "ModalityLUTSequence" in ds:
        try:
            return apply_modality_lut(arr, ds).astype(np.float64)
        except Exception:
            return arr.astype(np.float64)
    source = ds if "RescaleSlope" in ds else _frame_item(ds, frame, "PixelValueTransformationSequence",
                                                         "RescaleSlope")
    values = arr.astype(np.float64)
    if source is None:
        return values
    try:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return values
    return values * slope + intercept


def _first(value):
    if value is None:
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _voi(ds, values, frame, window):
    """
    The values through the VOI (explicit window, dataset window, VOI LUT,
    or min/max), scaled to 0..255 floats.
    """
    if window is not None:
        center, width = float(window[0]), float(window[1])
        function = window[2] if len(window) > 2 else "linear"
        if function not in WINDOW_FUNCTIONS or not (math.isfinite(center) and math.isfinite(width) and width > 0):
            raise BadRequest("The window must have a finite center, a width > 0 and a known function")
        return _window(values, center, width, function)
    source = ds if "WindowCenter" in ds else _frame_item(ds, frame, "FrameVOILUTSequence", "WindowCenter")
    if source is not None:
        center, width = _first(source.get("WindowCenter")), _first(source.get("WindowWidth"))
        function = str(source.get("VOILUTFunction") or "LINEAR").lower().replace("_", "-")
        if center is not None and width is not None and width > 0 and function in WINDOW_FUNCTIONS:
            return _window(values, center, max(width, 1.0) if function == "linear" else width, function)
    if "VOILUTSequence" in ds:
        try:
            values = apply_voi(values, ds).astype(np.float64)
        except Exception:
            pass
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) * (255.0 / (high - low))


def _window(values, center, width, function):
    """
    PS3.3 C.11.2.1.2 windowing to 0..255.
    """
    if function == "sigmoid":
        return 255.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
    if function == "linear-exact":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    span = max(width - 1.0, 1e-9)
    return np.clip((values - (center - 0.5)) / span + 0.5, 0.0, 1.0) * 255.0


def _fit(image, width, height, enlarge):
    from PIL import Image

    scale = min(width / image.width, height / image.height)
    if scale >= 1 and not enlarge:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def _encode(image, media_type, quality):
    media = _media(media_type)
    out = io.BytesIO()
    if media == "image/jpeg":
        image.save(out, "JPEG", quality=int(quality or DEFAULT_QUALITY))
    else:
        image.save(out, RENDERED_FORMATS[media])
    return out.getvalue()


# -- rendered parameters ----------------------------------------------------------


def parse_render_params(query):
    """
    The rendering parameters of a rendered or thumbnail request.

    @param query: the query string as C{{name: [value, ...]}}.
    @return: C{dict(viewport=(vw, vh) or None, quality=int or None,
        window=(center, width, function) or None)}.
    @raise BadRequest: for an unknown parameter, a parameter given twice,
        or a bad value.
    """
    params = {"viewport": None, "quality": None, "window": None}
    for name, values in query.items():
        if name in ("accept", "charset", "annotation", "iccprofile"):
            continue
        if name not in params:
            raise BadRequest(f"Unknown query parameter {_name(name)} for a rendered resource")
        if len(values) != 1:
            raise BadRequest(f"Query parameter {name} is given more than once")
        value = values[0]
        if name == "viewport":
            params[name] = _viewport(value)
        elif name == "quality":
            if not _NUMBER.match(value) or not 1 <= int(value) <= 100:
                raise BadRequest("Query parameter quality must be an integer from 1 to 100")
            params[name] = int(value)
        else:
            params[name] = _window_param(value)
    return params


def _name(name):
    name = re.sub(r"[\x00-\x1f\x7f]", "?", name)
    return repr(name if len(name) <= 64 else name[:61] + "...")


def _viewport(value):
    parts = value.split(",")
    if len(parts) not in (2, 6):
        raise BadRequest("Query parameter viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
    vw, vh = parts[:2]
    if not (_NUMBER.match(vw) and _NUMBER.match(vh)) or not (1 <= int(vw) <= MAX_VIEWPORT and
                                                          1 <= int(vh) <= MAX_VIEWPORT):
        raise BadRequest(f"Query parameter viewport: vw and vh must be integers from 1 to {MAX_VIEWPORT}")
    if len(parts) == 6 and not all(part == "" or _SIGNED.match(part) for part in parts[2:]):
        raise BadRequest("Query parameter viewport: sx, sy, sw and sh must be integers")
    return (int(vw), int(vh))


def _window_param(value):
    parts = value.split(",")
    if len(parts) not in (2, 3) or not all(_DECIMAL.match(part) for part in parts[:2]):
        raise BadRequest("Query parameter window must be center,width,function (function: " +
                         ", ".join(WINDOW_FUNCTIONS) + ")")
    center, width = float(parts[0]), float(parts[1])
    function = parts[2] if len(parts) == 3 else "linear"
    if function not in WINDOW_FUNCTIONS:
        raise BadRequest("Query parameter window: the function must be one of " + ", ".join(WINDOW_FUNCTIONS))
    if not (math.isfinite(center) and math.isfinite(width)):
        raise BadRequest("Query parameter window: center and width must be finite numbers")
    if width < 1 if function == "linear" else width <= 0:
        raise BadRequest("Query parameter window: the width must be >= 1 (linear) or > 0")
    return (center, width, function)
