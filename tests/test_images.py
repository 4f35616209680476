"""spformer.images: every PIL mode to 8-bit RGB without clipping, and bad files named.

Oracles are independent of the code under test: the 8-bit array a 16-bit file was made from
(``v * 257`` must read back as ``v``), numpy palette look-ups and alpha blends, ``np.rot90`` for the
EXIF orientation, and a 48-bit PNG written byte by byte here (PIL cannot write one).
"""
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from spformer.eval.datasets import read_image
from spformer.images import ImageReadError, open_rgb, read_rgb, to_rgb


@pytest.fixture(scope='module')
def rgb8():
    """A known 8-bit photo (96x128: not square, so a rotation shows), with 0 and 255 in it."""
    from skimage.data import astronaut
    image = astronaut()[:384:4, :512:4].copy()
    image[0, 0] = 0
    image[0, 1] = 255
    return image


def _grey(rgb):
    return np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).clip(0, 255).astype(np.uint8)


def write_png48(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (colour type 2, bit depth 16), written without PIL."""
    h, w, _ = rgb16.shape
    raw = b''.join(b'\x00' + rgb16[y].astype('>u2').tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    header = struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def write_int16_tiff(path, values: np.ndarray) -> None:
    """A signed 16-bit grey TIFF (SampleFormat 2, as CT scans are stored), written without PIL."""
    h, w = values.shape
    data = values.astype('<i2').tobytes()
    tags = [(256, 4, w), (257, 4, h), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 4, h), (279, 4, len(data)), (339, 3, 2)]
    ifd_size = 2 + 12 * len(tags) + 4
    tags = [(t, k, 8 + ifd_size if t == 273 else v) for t, k, v in tags]  # pixels right after the IFD
    ifd = struct.pack('<H', len(tags)) + b''.join(
        struct.pack('<HHI', t, k, 1) + (struct.pack('<HH', v, 0) if k == 3 else struct.pack('<I', v))
        for t, k, v in tags) + struct.pack('<I', 0)
    with open(path, 'wb') as f:
        f.write(b'II*\x00' + struct.pack('<I', 8) + ifd + data)


# ------------------------------------------------------------------------------------------ 16 bits

def test_16bit_grey_png_reads_as_its_8bit_original(rgb8, tmp_path):
    grey = _grey(rgb8)
    Image.fromarray(grey).save(tmp_path / 'grey8.png')
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'grey16.png')  # the same picture in 16 bits
    with Image.open(tmp_path / 'grey16.png') as im:
        assert im.mode == 'I;16'  # what PIL decodes a 16-bit grey PNG to
        clipped = np.asarray(im.convert('RGB'))  # the fault: PIL clips 0..65535 to 0..255
    assert set(np.unique(clipped)) <= {0, 255}

    expected = np.repeat(grey[..., None], 3, axis=2)
    image = open_rgb(tmp_path / 'grey16.png')
    assert image.mode == 'RGB' and image.size == (grey.shape[1], grey.shape[0])
    np.testing.assert_array_equal(np.asarray(image), expected)
    for read in (read_rgb, read_image):  # the array readers of the evaluation
        array = read(str(tmp_path / 'grey16.png'))
        assert array.dtype == np.uint8 and array.shape == expected.shape
        np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(read_rgb(tmp_path / 'grey8.png'), expected)


def test_slic_segments_a_16bit_file_as_its_8bit_original(rgb8, tmp_path):
    from spformer.eval import Slic, achievable_segmentation_accuracy
    grey = _grey(rgb8)
    Image.fromarray(grey).save(tmp_path / 'grey8.png')
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'grey16.png')
    slic = Slic(64)
    from_8 = slic.segment(read_image(str(tmp_path / 'grey8.png')))
    from_16 = slic.segment(read_image(str(tmp_path / 'grey16.png')))
    np.testing.assert_array_equal(from_16, from_8)
    gt = (grey > 128).astype(np.int64)
    assert achievable_segmentation_accuracy(from_16, gt) == achievable_segmentation_accuracy(from_8, gt)


@pytest.mark.parametrize('mode', ['I;16', 'I;16L', 'I;16B', 'I'])
def test_16bit_and_int32_modes_use_the_16bit_range(rgb8, mode):
    grey = _grey(rgb8)
    values = grey.astype(np.int64) * 257
    dtype = {'I;16': '<u2', 'I;16L': '<u2', 'I;16B': '>u2', 'I': '<i4'}[mode]
    image = Image.frombytes(mode, (grey.shape[1], grey.shape[0]), values.astype(dtype).tobytes())
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.repeat(grey[..., None], 3, axis=2))
    # rounding to the nearest level: 65535 / 255 = 257 per level, half a level is 128.5
    steps = Image.frombytes(mode, (4, 1), np.array([128, 129, 65406, 65535]).astype(dtype).tobytes())
    assert np.asarray(to_rgb(steps))[0, :, 0].tolist() == [0, 1, 254, 255]


def test_signed_16bit_and_int32_values_use_their_types_range(tmp_path):
    # Signed 16-bit (CT numbers): PIL gives mode 'I'; negative values mean the int16 range.
    values = np.array([[-32768, -1024, 0, 1000, 32767]], np.int16)
    write_int16_tiff(tmp_path / 's16.tif', values)
    with Image.open(tmp_path / 's16.tif') as im:
        assert im.mode == 'I'
    expected = np.rint((values.astype(float) + 32768) * 255 / 65535).astype(int)[0].tolist()
    assert read_rgb(tmp_path / 's16.tif')[0, :, 0].tolist() == expected == [0, 124, 128, 131, 255]
    values = np.array([[-2 ** 31, 0, 70000, 2 ** 31 - 1]], np.int32)
    out = np.asarray(to_rgb(Image.fromarray(values, 'I')))[0, :, 0]
    assert out.tolist() == [0, 128, 128, 255]  # nothing clipped: the type's range, not 0..255


def test_48bit_rgb_png_reads_as_its_8bit_original(rgb8, tmp_path):
    write_png48(tmp_path / 'rgb48.png', rgb8.astype(np.uint16) * 257)
    with Image.open(tmp_path / 'rgb48.png') as im:
        assert im.mode == 'RGB'  # PIL's decoder keeps the high byte of each 16-bit channel
    np.testing.assert_array_equal(read_rgb(tmp_path / 'rgb48.png'), rgb8)


def test_float_image_is_taken_as_0_to_1_and_clipped():
    values = np.array([[-0.5, 0.0, 0.25, 0.5, 1.0, 2.0, np.nan]], np.float32)
    out = np.asarray(to_rgb(Image.fromarray(values, 'F')))
    assert out.shape == (1, 7, 3)
    assert out[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 0]
    assert (out == out[..., :1]).all()


# ------------------------------------------------------------------------------------------ other modes

def test_palette_png_goes_through_its_palette(rgb8, tmp_path):
    palette_image = Image.fromarray(rgb8).quantize(colors=16)
    palette_image.save(tmp_path / 'p.png')
    with Image.open(tmp_path / 'p.png') as im:
        assert im.mode == 'P'
        indices = np.asarray(im)
        palette = np.array(im.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(read_rgb(tmp_path / 'p.png'), palette[indices])


def test_palette_transparency_is_composited_onto_white(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), 'P')
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.save(tmp_path / 'pt.png', transparency=0)
    out = read_rgb(tmp_path / 'pt.png')
    assert out.tolist() == [[[255, 255, 255], [200, 100, 50]], [[200, 100, 50], [255, 255, 255]]]


@pytest.mark.parametrize('bits', [1, 2, 4])
def test_low_bit_depth_palette_png_goes_through_its_palette(tmp_path, bits):
    # 1/2/4-bit palette PNGs (what label-like masks and GIF conversions are often stored as), with a
    # palette written here whose grey levels are not the indices: the numpy look-up is the oracle.
    indices = np.arange(6 * 8).reshape(6, 8) % (1 << bits)
    palette = np.array([[(37 * i + 11) % 256, (255 - 60 * i) % 256, (90 + 20 * i) % 256]
                        for i in range(1 << bits)], np.uint8)
    image = Image.fromarray(indices.astype(np.uint8), 'P')
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / 'p.png', bits=bits)
    with Image.open(tmp_path / 'p.png') as im:
        assert im.mode == 'P' and np.array_equal(np.asarray(im), indices)
    for read in (read_rgb, read_image):
        np.testing.assert_array_equal(read(str(tmp_path / 'p.png')), palette[indices])


def test_16bit_grey_tiff_file_is_scaled_and_rounded(tmp_path):
    # A 16-bit unsigned grey TIFF on disk (microscopy): round(x * 255 / 65535), half a level is 128.5.
    Image.fromarray(np.array([[0, 128, 129, 257 * 100, 65406, 65535]], np.uint16)).save(tmp_path / 'g.tif')
    with Image.open(tmp_path / 'g.tif') as im:
        assert im.mode.startswith('I;16')
    out = read_image(str(tmp_path / 'g.tif'))
    assert out.shape == (1, 6, 3) and (out == out[..., :1]).all()
    assert out[0, :, 0].tolist() == [0, 0, 1, 100, 254, 255]


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return colour.astype(np.float64) * a + 255 * (1 - a)


@pytest.mark.parametrize('mode', ['RGBA', 'LA'])
def test_alpha_is_composited_onto_white(rgb8, tmp_path, mode):
    h, w, _ = rgb8.shape
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    colour = rgb8 if mode == 'RGBA' else np.repeat(_grey(rgb8)[..., None], 3, axis=2)
    bands = np.dstack([colour, alpha]) if mode == 'RGBA' else np.dstack([colour[..., 0], alpha])
    Image.fromarray(bands, mode).save(tmp_path / 'alpha.png')
    out = read_rgb(tmp_path / 'alpha.png').astype(np.int64)
    assert np.abs(out - _on_white(colour, alpha)).max() <= 1  # PIL's integer blend: within one level
    np.testing.assert_array_equal(out[:, 0], 255)  # transparent: white, whatever colour is stored there
    np.testing.assert_array_equal(out[:, -1], colour[:, -1])  # opaque: the colour exactly


def test_16bit_grey_transparency_key_is_composited_onto_white(tmp_path):
    values = np.array([[0, 1000, 65535, 1000, 257]], '<u2')
    Image.frombytes('I;16', (5, 1), values.tobytes()).save(tmp_path / 'key.png', transparency=1000)
    with Image.open(tmp_path / 'key.png') as im:
        assert im.mode == 'I;16' and im.info['transparency'] == 1000
    assert read_rgb(tmp_path / 'key.png')[0, :, 0].tolist() == [0, 255, 255, 255, 1]


def test_a_broken_exif_block_keeps_the_pixels(rgb8, monkeypatch):
    import spformer.images

    def broken(image):
        raise SyntaxError('not a TIFF file')
    monkeypatch.setattr(spformer.images.ImageOps, 'exif_transpose', broken)
    with pytest.warns(UserWarning, match='EXIF could not be read.*orientation not applied'):
        out = to_rgb(Image.fromarray(rgb8))
    np.testing.assert_array_equal(np.asarray(out), rgb8)


def test_opaque_rgba_is_its_rgb(rgb8):
    rgba = Image.fromarray(np.dstack([rgb8, np.full(rgb8.shape[:2], 255, np.uint8)]), 'RGBA')
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), rgb8)


def test_grey_bilevel_and_colour_spaces(rgb8, tmp_path):
    grey = _grey(rgb8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(grey, 'L'))), np.repeat(grey[..., None], 3, 2))
    bilevel = np.asarray(to_rgb(Image.fromarray(grey > 128)))
    np.testing.assert_array_equal(bilevel[..., 0], np.where(grey > 128, 255, 0))
    for mode in ('YCbCr', 'LAB'):  # PIL's conversions back to RGB: within a few levels of the original
        assert np.abs(np.asarray(to_rgb(Image.fromarray(rgb8).convert(mode))).astype(int) - rgb8).max() <= 8, mode


def test_cmyk_jpeg(rgb8, tmp_path):
    Image.fromarray(rgb8).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
    with Image.open(tmp_path / 'cmyk.jpg') as im:
        assert im.mode == 'CMYK'
    out = read_rgb(tmp_path / 'cmyk.jpg')
    assert out.shape == rgb8.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb8).mean() < 4  # JPEG-lossy, but the same colours


def test_exif_orientation_is_applied_once(rgb8, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the stored pixels rotated 90 degrees clockwise
    Image.fromarray(rgb8).save(tmp_path / 'turned.jpg', quality=95, exif=exif)
    with Image.open(tmp_path / 'turned.jpg') as im:
        stored = np.asarray(im.convert('RGB'))
    assert stored.shape == rgb8.shape
    image = open_rgb(tmp_path / 'turned.jpg')
    np.testing.assert_array_equal(np.asarray(image), np.rot90(stored, k=-1))
    assert image.size == (rgb8.shape[0], rgb8.shape[1])
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image))  # not turned twice


def test_to_rgb_of_a_lazily_opened_truncated_image_raises_pils_error(rgb8, tmp_path):
    # As Hugging Face datasets may hand it over: decoding fails inside to_rgb, with PIL's own error
    # (the training script catches it), never mistaken for an unreadable EXIF block.
    Image.fromarray(rgb8).save(tmp_path / 'good.png')
    data = (tmp_path / 'good.png').read_bytes()
    (tmp_path / 'cut.png').write_bytes(data[:len(data) // 2])
    import warnings
    with Image.open(tmp_path / 'cut.png') as lazy, warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(OSError, match='truncated'):
            to_rgb(lazy)


def test_to_rgb_returns_a_new_image_and_rejects_non_images(rgb8):
    source = Image.fromarray(rgb8)
    out = to_rgb(source)
    assert out is not source and out.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(out), rgb8)
    with pytest.raises(TypeError, match='to_rgb takes a PIL image, got ndarray'):
        to_rgb(rgb8)


# ------------------------------------------------------------------------------------------ bad files

def _bad_files(tmp_path, rgb8):
    Image.fromarray(rgb8).save(tmp_path / 'good.png')
    Image.fromarray(rgb8).save(tmp_path / 'good.jpg', quality=90)
    png, jpg = (tmp_path / 'good.png').read_bytes(), (tmp_path / 'good.jpg').read_bytes()
    files = {
        'truncated.png': (png[:len(png) // 2], 'truncated image data'),
        'truncated.jpg': (jpg[:len(jpg) // 2], 'truncated image data'),
        'garbage.jpg': (bytes(range(256)) * 4, 'not an image, or in a format PIL cannot read'),
        'empty.png': (b'', 'the file is empty (0 bytes)'),
        'notes.png': (b'these are notes, not a picture\n', "the file starts with b'these are notes,"),
        'lfs.png': (b'version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 3\n', 'a Git LFS pointer'),
    }
    cases = []
    for name, (data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        cases.append((tmp_path / name, reason))
    os.symlink(tmp_path / 'gone.png', tmp_path / 'dangling.png')
    (tmp_path / 'folder.png').mkdir()
    cases += [
        (tmp_path / 'dangling.png', f"a dangling symbolic link (to '{tmp_path / 'gone.png'}'"),
        (tmp_path / 'folder.png', 'it is a folder, not an image file'),
        (tmp_path / 'missing.png', 'no such file'),
        (tmp_path / 'good.png' / 'x.png', 'a part of the path is a file, not a folder'),
    ]
    return cases


def test_bad_files_raise_image_read_error_naming_the_file(rgb8, tmp_path):
    for path, reason in _bad_files(tmp_path, rgb8):
        for read in (open_rgb, read_rgb, read_image):
            with pytest.raises(ImageReadError) as e:
                read(str(path))
            message = str(e.value)
            assert message == f"cannot read image '{path}': {e.value.reason}", message
            assert reason in e.value.reason, (path, message)
            assert e.value.path == str(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # left as it was: truncation is an error


@pytest.mark.skipif(os.geteuid() == 0, reason='running as root: a mode-000 file is still readable, so '
                                             'permission denied cannot happen here')
def test_unreadable_permissions(rgb8, tmp_path):
    Image.fromarray(rgb8).save(tmp_path / 'locked.png')
    os.chmod(tmp_path / 'locked.png', 0)
    try:
        with pytest.raises(ImageReadError, match=f"^cannot read image '{tmp_path / 'locked.png'}': permission denied$"):
            open_rgb(tmp_path / 'locked.png')
    finally:
        os.chmod(tmp_path / 'locked.png', 0o644)


def test_permission_denied_is_named(rgb8, tmp_path, monkeypatch):
    # What the OS says for a mode-000 file (simulated: the test above cannot fail as root).
    import errno
    import spformer.images
    path = tmp_path / 'locked.png'
    Image.fromarray(rgb8).save(path)

    def denied(fp, *args, **kwargs):
        raise PermissionError(errno.EACCES, 'Permission denied', str(fp))
    monkeypatch.setattr(spformer.images.Image, 'open', denied)
    with pytest.raises(ImageReadError, match=f"^cannot read image '{path}': permission denied$"):
        open_rgb(path)


def test_image_read_error_survives_pickling_and_worker_reraise(tmp_path):
    (tmp_path / 'empty.png').write_bytes(b'')
    with pytest.raises(ImageReadError) as e:
        open_rgb(tmp_path / 'empty.png')
    copy = pickle.loads(pickle.dumps(e.value))
    assert str(copy) == str(e.value) and copy.path == e.value.path and copy.reason == e.value.reason
    assert isinstance(e.value, ValueError)
    again = ImageReadError(str(e.value))  # torch's DataLoader re-raises a worker's error from its message alone
    assert str(again) == str(e.value) and again.path is None
