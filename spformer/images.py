"""Reading images: the one place in spformer where an image file becomes RGB pixels.

Every tool reads its images here: the superpixel evaluation and ``spformer-visualize``
(:func:`spformer.eval.datasets.read_image`), ``spformer-demo``, the Hub card's sample image, and the
training script (:func:`open_rgb` as the ImageFolder loader, :func:`to_rgb` on decoded Hugging Face
dataset images). Label maps are *not* read here: their pixel values are class ids, not colours
(:mod:`spformer.eval.datasets` reads them as they are).

    from spformer.images import open_rgb, read_rgb, to_rgb, ImageReadError

    image = open_rgb('scan_16bit.png')     # PIL.Image.Image, mode 'RGB', 8 bits per channel
    array = read_rgb('photo.jpg')          # numpy (H, W, 3) uint8
    image = to_rgb(pil_image)              # an image you already decoded

Why not ``Image.open(path).convert('RGB')`` (what timm and torchvision do): PIL *clips* 16- and
32-bit integer images to 0..255 on that conversion, so a 16-bit PNG or TIFF (the rule for
microscopy and medical images) comes out nearly black and white; it ignores the EXIF orientation of
camera JPEGs; it exposes whatever colour transparent pixels happen to store; and a truncated file
fails later, in a traceback that does not name it. :func:`to_rgb` does the conversion as follows.

==================================  ===============================================================
PIL mode                            8-bit RGB
==================================  ===============================================================
``RGB``                             as is
``I;16``, ``I;16B``, ``I;16L``      scaled by the full 16-bit range: ``round(x * 255 / 65535)``
(16-bit grey: PNG, TIFF)            (so ``v * 257`` gives back ``v`` exactly); grey replicated to
                                    3 channels. Not stretched to the image's own min/max: the same
                                    value is the same grey in every image (12-bit data in a 16-bit
                                    file stays dark; rescale it yourself if you want it stretched).
``I`` (32-bit signed integer)       PIL decodes some 16-bit files to ``I`` (signed 16-bit TIFFs,
                                    older PILs' 16-bit PNGs), and ``I`` does not say which type
                                    the file held, so the range is that of the smallest type the
                                    values fit: 0..65535 -> scaled as 16-bit above; else
                                    -32768..32767 (signed 16-bit, e.g. CT numbers) -> ``-32768`` is
                                    0 and ``32767`` is 255; else the int32 range, ``-2**31`` -> 0
                                    and ``2**31 - 1`` -> 255. Nothing is clipped either way.
``F`` (32-bit float)                taken as [0, 1] (the float image convention of scikit-image
                                    and torchvision), clipped to it, NaN as 0: ``round(x * 255)``.
``1``, ``L``                        grey replicated to 3 channels.
``P`` (palette)                     through its palette.
``RGBA``, ``LA``, ``PA``, ``RGBa``  composited onto **white**; fully opaque pixels are unchanged.
``La``; a ``transparency`` key      The colour stored under a transparent pixel is undefined
(tRNS) on ``P``, ``L``, ``RGB``,    (encoders leave black, white or leftovers from editing there),
16-bit grey                         so dropping alpha (timm's ``convert('RGB')``) makes the result
                                    depend on the encoder; compositing gives what a viewer shows.
                                    White rather than black: transparent images (logos, product
                                    shots, icons, scans) are made to be seen on a white page, and
                                    compositing onto black would erase dark content and darken
                                    anti-aliased edges.
``CMYK``, ``YCbCr``, ``LAB``,       PIL's conversion. Embedded ICC profiles are not applied, as in
``HSV``, ``RGBX``                   timm and torchvision: RGB values are used as stored.
==================================  ===============================================================

The EXIF orientation tag (camera JPEGs, also PNG/WebP/TIFF) is applied first
(:func:`PIL.ImageOps.exif_transpose`; idempotent: the tag is removed from the result, so an image
already turned, e.g. by Hugging Face ``datasets``, is not turned twice).

Files with 16 bits per *colour* channel (48-bit RGB and 64-bit RGBA PNGs, 16-bit RGB TIFFs) are
reduced to 8 bits by PIL's own decoder, which keeps the high byte (``x // 256``: within one level
of ``x * 255 / 65535``, and ``v * 257`` gives ``v`` exactly): they arrive as ``RGB``/``RGBA``
already, never clipped. Multi-frame files (GIF, APNG, multi-page TIFF) give their first frame.

:func:`open_rgb` decodes the whole file at once, with PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``
left as it is (False unless your program set it), so a damaged file fails *here*, as an
:class:`ImageReadError` that names the file and why: missing, a dangling symbolic link, a folder,
permission denied, empty, not an image (unknown format, with the first bytes of the file, and a Git
LFS pointer recognised), truncated or corrupt data, or too large (PIL's decompression-bomb limit).
"""
import os
import warnings
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spformer.errors import UserError

__all__ = ['ImageReadError', 'open_rgb', 'read_rgb', 'to_rgb']

PathLike = Union[str, 'os.PathLike[str]']

# Modes with an alpha band.
_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
# Modes whose 'transparency' info (a tRNS colour key or palette index) PIL turns into alpha.
_KEYED_MODES = ('1', 'L', 'P', 'RGB')


class ImageReadError(UserError):
    """An image file that cannot be read: the message names the file and why.

    Attributes:
        path: The file (as given), or None.
        reason: Why it cannot be read (the message without the file name), or None.

    A ``ValueError``, and constructible from its message alone (so a DataLoader worker can re-raise it).
    """

    def __init__(self, message: str, path: Optional[PathLike] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.path = path
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.args[0], self.path, self.reason)


def _fail(path: PathLike, reason: str) -> ImageReadError:
    return ImageReadError(f"cannot read image '{os.fspath(path)}': {reason}", path, reason)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as an 8-bit RGB image, without clipping (see the module docstring for each mode).

    The EXIF orientation is applied (an EXIF block PIL cannot parse is skipped with a warning). Returns a
    new image (``image``'s pixels are left as they are).

    Raises:
        TypeError: ``image`` is not a PIL image.
        ValueError: A mode PIL cannot convert.
        OSError, SyntaxError, ...: PIL's own errors when ``image`` was opened lazily (``Image.open``
            without ``load``) and its data is damaged; :func:`open_rgb` turns them all into an
            :class:`ImageReadError` naming the file.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f'to_rgb takes a PIL image, got {type(image).__name__}')
    image.load()  # a lazily opened image is decoded here: its errors (truncated data) are never taken for EXIF's
    try:
        image = ImageOps.exif_transpose(image)  # a copy, turned if the EXIF says so (tag removed)
    except Exception as e:  # a malformed EXIF block: the pixels are still good, keep them as stored
        warnings.warn(f'image EXIF could not be read ({type(e).__name__}: {e}); orientation not applied')
        image = image.copy()
    mode = image.mode
    if mode == 'RGB' and image.info.get('transparency') is None:
        return image
    if mode.startswith('I') or mode == 'F':
        return _deep_to_rgb(image)
    if mode in _ALPHA_MODES or (mode in _KEYED_MODES and image.info.get('transparency') is not None):
        if mode == 'La':
            image = image.convert('LA')  # PIL has no La -> RGBA
        return _composite_on_white(image.convert('RGBA'))
    try:
        return image.convert('RGB')
    except (ValueError, OSError) as e:
        raise ValueError(f'PIL cannot convert image mode {mode!r} to RGB ({e})') from e


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    if rgba.getextrema()[3][0] == 255:  # fully opaque: exactly the colour bands
        return rgba.convert('RGB')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')


def _deep_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit ('I;16*'), 32-bit integer ('I') and float ('F') grey -> 8-bit RGB (module docstring)."""
    mode = image.mode
    values = np.asarray(image)
    if mode == 'F':
        grey = np.nan_to_num(values.astype(np.float64), nan=0.0).clip(0.0, 1.0)
        grey = np.rint(grey * 255.0).astype(np.uint8)
    else:
        if values.dtype.kind not in 'ui':
            raise ValueError(f'PIL image mode {mode!r} gave {values.dtype} pixels; expected integers')
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low >= 0 and high <= 65535:  # 16-bit data (also PIL's 'I' of a 16-bit file): round(x * 255 / 65535)
            grey = (values.astype(np.uint32) * 255 + 32767) // 65535
        else:  # the int16 range if the values fit it, else the int32 range: round((x - low) * 255 / span)
            offset, span = (2 ** 15, 2 ** 16 - 1) if low >= -2 ** 15 and high < 2 ** 15 else (2 ** 31, 2 ** 32 - 1)
            grey = ((values.astype(np.int64) + offset) * 255 + span // 2) // span
        grey = grey.astype(np.uint8)
    out = Image.fromarray(np.repeat(grey[..., None], 3, axis=2), 'RGB')
    key = image.info.get('transparency')
    if isinstance(key, (int, np.integer)) and mode != 'F':  # a tRNS grey key, in the file's own values
        alpha = np.where(np.asarray(image) == key, 0, 255).astype(np.uint8)
        if not alpha.all():
            out = _composite_on_white(Image.merge('RGBA', (*out.split(), Image.fromarray(alpha, 'L'))))
    return out


def _open_reason(path: PathLike, error: BaseException) -> str:
    """Why ``Image.open``/``load`` failed on ``path``, in words (checked on the file system first)."""
    text = os.fspath(path)
    if os.path.islink(text) and not os.path.exists(text):
        return f"a dangling symbolic link (to '{os.readlink(text)}', which does not exist)"
    if isinstance(error, NotADirectoryError):
        return 'a part of the path is a file, not a folder'
    if isinstance(error, FileNotFoundError) or not os.path.lexists(text):
        return 'no such file'
    if isinstance(error, IsADirectoryError) or os.path.isdir(text):
        return 'it is a folder, not an image file'
    if isinstance(error, PermissionError):
        return 'permission denied'
    if isinstance(error, Image.DecompressionBombError):
        return f'too large to decode safely ({error})'
    if isinstance(error, UnidentifiedImageError):
        try:
            size = os.path.getsize(text)
            with open(text, 'rb') as f:
                head = f.read(64)
        except OSError as e:
            return f'{type(e).__name__}: {e.strerror or e}'
        if size == 0:
            return 'the file is empty (0 bytes)'
        if head.startswith(b'version https://git-lfs'):
            return 'a Git LFS pointer, not the image itself (fetch it with `git lfs pull`)'
        if not os.path.isfile(text):
            return 'not a regular file'
        return f'not an image, or in a format PIL cannot read (unknown format; the file starts with {head[:16]!r})'
    if isinstance(error, (SyntaxError, ValueError, OSError, EOFError)):
        message = str(error) or type(error).__name__
        if 'truncated' in message.lower():
            return f'truncated image data ({message})'
        return f'corrupt image data ({type(error).__name__}: {message})'
    return f'{type(error).__name__}: {error}'


def open_rgb(path: PathLike) -> Image.Image:
    """Open an image file, decode all of it, and return it as 8-bit RGB (:func:`to_rgb`).

    Args:
        path: The image file.

    Returns:
        A PIL image of mode 'RGB', loaded (no file stays open).

    Raises:
        ImageReadError: The file cannot be read; the message names it and says why (missing, dangling
            symbolic link, folder, permission denied, empty, not an image, truncated or corrupt, too large).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'open_rgb takes a file path, got {type(path).__name__}')
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: truncation is found here, not in a later transform
            try:
                return to_rgb(image)
            except Exception as e:  # an unconvertible mode, a corrupt EXIF block, ...
                raise _fail(path, str(e) if isinstance(e, ValueError) else f'{type(e).__name__}: {e}') from e
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise _fail(path, _open_reason(path, e)) from e


def read_rgb(path: PathLike) -> np.ndarray:
    """:func:`open_rgb` as a (H, W, 3) uint8 numpy array (writable)."""
    return np.array(open_rgb(path))

