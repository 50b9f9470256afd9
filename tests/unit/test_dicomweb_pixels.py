"""
WADO-RS frames, rendered images and thumbnails (harmony.dicomweb.pixels)
with pydicom's bundled test files: native slicing (little/big endian,
1-bit), encapsulated frames as stored and decoded, media type/transfer
syntax rules, rendering (VOI, MONOCHROME1, colour, viewport) and the
parameter parsers.
"""

import copy
import io
import warnings

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder

from harmony.dicomweb.pixels import (
    frames,
    number_of_frames,
    parse_frame_list,
    parse_render_params,
    render,
    thumbnail,
    transfer_syntax,
)
from harmony.errors import BadRequest, NotAcceptable, NotFound

OCTET = "application/octet-stream"
EVRLE = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def read(name):
    path = get_testdata_file(name, download=False)
    assert path, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def decoded(ds, number):
    """What pydicom decodes for frame C{number}, as little endian bytes."""
    arr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=number - 1)
    if ds.BitsAllocated == 1:
        return np.packbits(arr.ravel(), bitorder="little").tobytes()
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def image(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# -- frame lists ---------------------------------------------------------------


def test_parse_frame_list():
    assert parse_frame_list("1") == [1]
    assert parse_frame_list("1,3,5") == [1, 3, 5]
    assert parse_frame_list("2,1,2") == [2, 1, 2]
    assert parse_frame_list(",".join(["1"] * 10000)) == [1] * 10000


@pytest.mark.parametrize("text", ["", ",", "1,", "0", "1,0", "a", "1;2", " 1", "-1", "1.0", "+1",
                                  ",".join(["1"] * 10001), "9999999999"])
def test_bad_frame_lists(text):
    with pytest.raises(BadRequest):
        parse_frame_list(text)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_number_of_frames():
    assert number_of_frames(read("CT_small.dcm")) == 1
    assert number_of_frames(read("rtdose.dcm")) == 15
    assert number_of_frames(read("SC_rgb_rle_2frame.dcm")) == 2
    assert number_of_frames(read("badVR.dcm")) == 1


def test_transfer_syntax():
    assert transfer_syntax(read("rtdose.dcm")) == "1.2.840.10008.1.2"
    assert transfer_syntax(read("MR_small_bigendian.dcm")) == "1.2.840.10008.1.2.2"


# -- native frames ---------------------------------------------------------------


def test_ct_small_single_frame():
    ds = read("CT_small.dcm")
    [(data, media, ts)] = frames(ds, [1], OCTET, EVRLE)
    assert (media, ts) == (OCTET, EVRLE)
    assert len(data) == 32768
    assert data == ds.PixelData
    assert frames(ds, [1], OCTET, None) == frames(ds, [1], "*/*", "*") == [(data, OCTET, EVRLE)]


def test_mr_small_every_encoding_gives_the_same_bytes():
    reference = frames(read("MR_small.dcm"), [1], OCTET, None)[0][0]
    assert len(reference) == 64 * 64 * 2
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm"):
        assert frames(read(name), [1], OCTET, EVRLE)[0][0] == reference, name


def test_rtdose_multiframe_slices():
    ds = read("rtdose.dcm")
    size = 10 * 10 * 4
    got = frames(ds, [2, 15, 2], OCTET, None)
    second = ds.PixelData[size:2 * size]
    assert [d for d, _, _ in got] == [second, ds.PixelData[14 * size:], second]
    assert {(m, t) for _, m, t in got} == {(OCTET, EVRLE)}
    big = read("rtdose_expb.dcm")
    assert frames(big, [2, 15], OCTET, None) == got[:2]
    assert frames(read("rtdose_rle.dcm"), [2], OCTET, None)[0][0] == got[0][0]


@pytest.mark.parametrize("name", ["SC_rgb_small_odd_big_endian.dcm", "liver_expb_1frame.dcm", "ExplVR_BigEnd.dcm"])
def test_big_endian_is_swapped_to_little(name):
    ds = read(name)
    data = frames(ds, [1], OCTET, None)[0][0]
    little = read(name.replace("_big_endian", "").replace("_expb", "")) if "ExplVR" not in name else None
    if little is not None:
        assert data == frames(little, [1], OCTET, None)[0][0]
    if ds.get("PlanarConfiguration") == 1:
        # the stored planar layout is kept
        assert data == ds.pixel_array.transpose(2, 0, 1).tobytes()
    else:
        assert data == decoded(ds, 1)


def test_one_bit_frames_are_repacked():
    ds = read("liver_1frame.dcm")
    assert ds.BitsAllocated == 1
    assert frames(ds, [1], OCTET, None)[0][0] == ds.PixelData[:512 * 512 // 8]
    # three 5x3 frames (15 bits each): frames 2 and 3 start inside a byte
    pixels = np.random.default_rng(7).integers(0, 2, size=(3, 5, 3), dtype=np.uint8)
    multi = copy.deepcopy(ds)
    multi.Rows, multi.Columns, multi.NumberOfFrames = 5, 3, 3
    multi.PixelData = np.packbits(pixels.ravel(), bitorder="little").tobytes() + b"\0"
    for number in (1, 2, 3):
        [(data, media, ts)] = frames(multi, [number], OCTET, None)
        assert data == np.packbits(pixels[number - 1].ravel(), bitorder="little").tobytes()
        assert len(data) == 2
        unpacked = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:15]
        assert np.array_equal(unpacked.reshape(5, 3), pixels[number - 1])


def test_deflated_dataset_is_native():
    ds = read("image_dfl.dcm")
    [(data, media, ts)] = frames(ds, [1], "*/*", None)
    assert (len(data), media, ts) == (512 * 512, OCTET, EVRLE)


# -- encapsulated frames -----------------------------------------------------------


def test_rle_as_stored_and_uncompressed():
    ds = read("SC_rgb_rle_2frame.dcm")
    stored = list(generate_frames(ds.PixelData, number_of_frames=2))
    got = frames(ds, [1, 2], "*/*", None)
    assert got == [(stored[0], "image/dicom-rle", RLE), (stored[1], "image/dicom-rle", RLE)]
    assert frames(ds, [2], "image/dicom-rle", None) == [got[1]]
    assert frames(ds, [2], "image/dicom-rle", RLE) == [got[1]]
    assert frames(ds, [2], "*/*", RLE) == [got[1]]
    assert frames(ds, [2], "application/octet-stream", "*") == frames(ds, [2], OCTET, EVRLE)
    raw = frames(ds, [1, 2], OCTET, EVRLE)
    assert [len(d) for d, _, _ in raw] == [30000, 30000]
    assert {(m, t) for _, m, t in raw} == {(OCTET, EVRLE)}
    assert raw[1][0] == ds.pixel_array[1].tobytes()
    # the first pixel of frame 1 is red, interleaved
    assert raw[0][0][:3] == bytes([255, 0, 0])


def test_jpeg_baseline_as_stored_and_decoded():
    ds = read("SC_rgb_jpeg_dcmtk.dcm")
    [(data, media, ts)] = frames(ds, [1], "image/jpeg", None)
    assert (media, ts) == ("image/jpeg", JPEG_BASELINE)
    assert data.startswith(b"\xff\xd8")
    assert data == next(generate_frames(ds.PixelData, number_of_frames=1))
    assert frames(ds, [1], "image/jpeg", JPEG_BASELINE) == [(data, media, ts)]
    assert image(data).size == (100, 100)
    [(raw, media, ts)] = frames(ds, [1], OCTET, None)
    assert (len(raw), media, ts) == (100 * 100 * 3, OCTET, EVRLE)
    assert raw == decoded(ds, 1)


def test_jpeg2000_as_stored():
    ds = read("JPEG2000.dcm")
    [(data, media, ts)] = frames(ds, [1], "image/jp2", None)
    assert (media, ts) == ("image/jp2", "1.2.840.10008.1.2.4.91")
    assert len(frames(ds, [1], OCTET, None)[0][0]) == 1024 * 256 * 2


def test_jpeg_ls_as_stored_even_without_a_decoder():
    ds = read("MR_small_jpeg_ls_lossless.dcm")
    [(data, media, ts)] = frames(ds, [1], "image/jls", None)
    assert (media, ts) == ("image/jls", "1.2.840.10008.1.2.4.80")
    assert data == next(generate_frames(ds.PixelData, number_of_frames=1))
    assert frames(ds, [1], "*/*", "*") == [(data, media, ts)]
    if not get_decoder(ts).is_available:
        with pytest.raises(NotAcceptable):
            frames(ds, [1], OCTET, None)


def test_undecodable_frame_is_not_acceptable():
    # 12-bit JPEG Extended: Pillow cannot decode it
    ds = read("JPEG-lossy.dcm")
    assert frames(ds, [1], "image/jpeg", None)[0][1:] == ("image/jpeg", "1.2.840.10008.1.2.4.51")
    with pytest.raises(NotAcceptable):
        frames(ds, [1], OCTET, None)


@pytest.mark.parametrize(
    "name, media_type, ts",
    [
        ("CT_small.dcm", "image/jpeg", None),
        ("CT_small.dcm", OCTET, "1.2.840.10008.1.2"),
        ("CT_small.dcm", OCTET, JPEG_BASELINE),
        ("CT_small.dcm", "*/*", RLE),
        ("CT_small.dcm", "text/plain", None),
        ("SC_rgb_rle_2frame.dcm", "image/jpeg", None),
        ("SC_rgb_rle_2frame.dcm", "image/dicom-rle", JPEG_BASELINE),
        ("SC_rgb_jpeg_dcmtk.dcm", "image/jpeg", "1.2.840.10008.1.2.4.70"),
        ("SC_rgb_jpeg_dcmtk.dcm", "image/jls", None),
        ("SC_rgb_jpeg_dcmtk.dcm", "*/*", "1.2.840.10008.1.2.4.70"),
    ],
)
def test_not_acceptable(name, media_type, ts):
    with pytest.raises(NotAcceptable):
        frames(read(name), [1], media_type, ts)


@pytest.mark.parametrize("name, number", [("CT_small.dcm", 2), ("rtdose.dcm", 16), ("SC_rgb_rle_2frame.dcm", 3)])
def test_missing_frame(name, number):
    with pytest.raises(NotFound) as caught:
        frames(read(name), [1, number], OCTET, None)
    assert str(number) in caught.value.message
    with pytest.raises(NotFound):
        render(read(name), frame=number)


def test_no_pixel_data():
    ds = read("rtplan.dcm")
    for call in (lambda: frames(ds, [1], OCTET, None), lambda: render(ds), lambda: thumbnail(ds)):
        with pytest.raises(NotFound):
            call()


# -- rendered ---------------------------------------------------------------------


def test_render_ct_jpeg_and_png():
    ds = read("CT_small.dcm")
    arr = ds.pixel_array
    dark = np.unravel_index(arr.argmin(), arr.shape)
    bright = np.unravel_index(arr.argmax(), arr.shape)
    jpeg = image(render(ds))
    assert (jpeg.format, jpeg.size, jpeg.mode) == ("JPEG", (128, 128), "L")
    png = image(render(ds, "image/png"))
    assert (png.format, png.size, png.mode) == ("PNG", (128, 128), "L")
    # min/max scaling (CT_small has no window)
    assert png.getpixel((int(dark[1]), int(dark[0]))) == 0
    assert png.getpixel((int(bright[1]), int(bright[0]))) == 255
    assert jpeg.getpixel((int(bright[1]), int(bright[0]))) > jpeg.getpixel((int(dark[1]), int(dark[0]))) + 100
    assert image(render(ds, "image/gif")).format == "GIF"


def test_render_quality_changes_jpeg_size():
    ds = read("CT_small.dcm")
    assert len(render(ds, quality=10)) < len(render(ds, quality=100))


def test_explicit_window_wins_and_monochrome1_inverts():
    ds = read("MR_small.dcm")
    arr = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    center = float(np.median(arr))
    png = np.asarray(image(render(ds, "image/png", window=(center, 1, "linear"))))
    assert set(np.unique(png)) <= {0, 255}
    assert np.array_equal(png == 255, arr > center - 0.5)
    dataset_window = np.asarray(image(render(ds, "image/png")))
    assert not np.array_equal(dataset_window, png)
    mono1 = copy.deepcopy(ds)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    inverted = np.asarray(image(render(mono1, "image/png")))
    assert np.array_equal(inverted, 255 - dataset_window)


def test_dataset_window_is_used():
    ds = read("MR_small.dcm")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    default = np.asarray(image(render(ds, "image/png")))
    explicit = np.asarray(image(render(ds, "image/png", window=(center, width))))
    assert np.array_equal(default, explicit)
    no_window = copy.deepcopy(ds)
    del no_window.WindowCenter
    del no_window.WindowWidth
    assert not np.array_equal(np.asarray(image(render(no_window, "image/png"))), default)


@pytest.mark.parametrize("function", ["linear-exact", "sigmoid"])
def test_other_window_functions(function):
    ds = read("CT_small.dcm")
    png = np.asarray(image(render(ds, "image/png", window=(0, 400, function))))
    arr = ds.pixel_array.astype(float) - 1024
    assert (arr > 300).any() and (arr < -300).any()
    assert png[arr > 300].min() >= 200
    assert png[arr < -300].max() <= 55


def test_render_colour():
    rgb = image(render(read("SC_rgb_rle_2frame.dcm"), "image/png", frame=2))
    assert (rgb.mode, rgb.size) == ("RGB", (100, 100))
    ybr = image(render(read("SC_rgb_dcmtk_+eb+cy+np.dcm"), "image/png"))
    red = ybr.getpixel((0, 0))
    assert ybr.mode == "RGB" and red[0] > 200 and red[1] < 50 and red[2] < 50
    palette = image(render(read("examples_palette.dcm"), "image/png"))
    assert (palette.mode, palette.size) == ("RGB", (800, 350))


def test_render_one_bit():
    png = np.asarray(image(render(read("liver_1frame.dcm"), "image/png")))
    assert set(np.unique(png)) == {0, 255}


def test_viewport_keeps_aspect_ratio():
    assert image(render(read("CT_small.dcm"), viewport=(64, 32))).size == (32, 32)
    assert image(render(read("CT_small.dcm"), viewport=(512, 256))).size == (256, 256)
    assert image(render(read("JPEG2000.dcm"), viewport=(100, 100))).size == (25, 100)


def test_thumbnail():
    small = image(thumbnail(read("CT_small.dcm")))
    assert small.size == (128, 128)
    assert image(thumbnail(read("MR_small.dcm"))).size == (64, 64)
    tall = image(thumbnail(read("JPEG2000.dcm"), "image/png"))
    assert (tall.format, tall.size) == ("PNG", (32, 128))
    wide = image(thumbnail(read("examples_palette.dcm"), size=100))
    assert max(wide.size) == 100 and wide.size[0] == 100
    assert image(thumbnail(read("rtdose.dcm"))).size == (10, 10)


def test_render_bad_window_and_empty_frame_list():
    ds = read("CT_small.dcm")
    with pytest.raises(BadRequest):
        render(ds, window=(0, 0, "linear-exact"))
    with pytest.raises(BadRequest):
        render(ds, window=(0, 10, "gamma"))
    assert frames(ds, [], OCTET, None) == []


def test_render_not_acceptable():
    with pytest.raises(NotAcceptable):
        render(read("CT_small.dcm"), "image/webp")
    with pytest.raises(NotAcceptable):
        render(read("JPEG-lossy.dcm"))


# -- render parameters -------------------------------------------------------------


def test_parse_render_params():
    assert parse_render_params({}) == {"viewport": None, "quality": None, "window": None}
    assert parse_render_params({"viewport": ["200,100"], "quality": ["75"], "window": ["40,400,linear"]}) == {
        "viewport": (200, 100),
        "quality": 75,
        "window": (40.0, 400.0, "linear"),
    }
    assert parse_render_params({"viewport": ["200,100,0,0,-512,512"]})["viewport"] == (200, 100)
    assert parse_render_params({"window": ["-600.5,1500"]})["window"] == (-600.5, 1500.0, "linear")
    assert parse_render_params({"window": ["0,0.5,sigmoid"]})["window"] == (0.0, 0.5, "sigmoid")
    assert parse_render_params({"annotation": ["patient"], "accept": ["image/png"]})["window"] is None


@pytest.mark.parametrize(
    "query",
    [
        {"viewport": ["0,100"]},
        {"viewport": ["100"]},
        {"viewport": ["100,100,1"]},
        {"viewport": ["a,b"]},
        {"viewport": ["5000,100"]},
        {"viewport": ["100,100,x,0,1,1"]},
        {"quality": ["0"]},
        {"quality": ["101"]},
        {"quality": ["high"]},
        {"quality": ["50", "60"]},
        {"window": ["40"]},
        {"window": ["40,0"]},
        {"window": ["40,0.5,linear"]},
        {"window": ["40,400,gamma"]},
        {"window": ["a,400"]},
        {"window": ["40,400,linear,x"]},
        {"window": ["nan,400"]},
        {"frame": ["1"]},
    ],
)
def test_bad_render_params(query):
    with pytest.raises(BadRequest):
        parse_render_params(query)
