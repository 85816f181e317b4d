"""Every bad-image case gets a clear error naming the file; odd-but-valid modes become RGB."""
import io

import numpy as np
import pytest
from PIL import Image

from dermfusion.data.images import DecodeCache, ImageError, decode_image, read_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_truncated_jpeg(tmp_path):
    p = _save(Image.new("RGB", (200, 200), (120, 50, 30)), tmp_path / "ok.jpg", quality=95)
    data = p.read_bytes()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        read_image(bad)


def test_text_renamed_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image")
    with pytest.raises(ImageError, match="notes.jpg.*not an image"):
        read_image(p)


def test_missing_and_empty(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_image(tmp_path / "empty.jpg")


def test_header_bomb_refused_before_decoding(tmp_path):
    # a real 20000×20000 PNG header (1-bit, compresses to a few kB) — must be refused on size
    img = Image.new("1", (20000, 20000), 0)
    p = _save(img, tmp_path / "bomb.png", optimize=True)
    assert p.stat().st_size < 200_000
    with pytest.raises(ImageError, match="bomb.png.*(exceeds|bomb)"):
        read_image(p)


def test_cmyk_jpeg_to_rgb(tmp_path):
    p = _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    img = read_image(p)
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = np.asarray(img)[15, 20]
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red


def test_16bit_png_to_rgb(tmp_path):
    arr = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    p = _save(Image.fromarray(arr), tmp_path / "deep.png")
    img = read_image(p)
    out = np.asarray(img)
    assert img.mode == "RGB" and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # full range kept, not clipped to 255/65535


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA"])
def test_other_modes(tmp_path, mode):
    img = Image.new("RGBA", (20, 10), (10, 200, 30, 255)).convert(mode)
    p = _save(img, tmp_path / f"x_{mode}.png")
    assert read_image(p).mode == "RGB"


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    p = _save(img, tmp_path / "clear.png")
    assert tuple(np.asarray(read_image(p))[0, 0]) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    assert read_image(p).size == (20, 60)


def test_decode_image_from_bytes_names_upload():
    with pytest.raises(ImageError, match="clinical.jpg"):
        decode_image(b"\xff\xd8\xff garbage", "clinical.jpg")


def test_decode_cache_hits_and_invalidates(tmp_path):
    p = _save(Image.new("RGB", (300, 200), (10, 20, 30)), tmp_path / "a.jpg")
    cache = DecodeCache(tmp_path / "cache", size=50)
    a = cache.get(p)
    assert a.shape == (50, 75, 3) and a.dtype == np.uint8
    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 1
    b = DecodeCache(tmp_path / "cache", size=50).get(p)  # a fresh cache object reads the entry
    assert np.array_equal(a, b)
    _save(Image.new("RGB", (300, 200), (200, 20, 30)), p)  # same path, new content
    c = DecodeCache(tmp_path / "cache", size=50).get(p)
    assert c[0, 0, 0] > 150
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
