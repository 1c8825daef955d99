"""Image loading and encoding shared by the vision stages.

A row's image cell may be a path or URI string (local path, ``file://`` or ``s3://``, read
through ``udfs.io``), encoded image bytes (PNG, JPEG, ...), or a ``{"bytes": ..., "path":
...}`` struct (the Hugging Face ``datasets`` image layout). Every failure becomes an
``InputError`` naming the row id, the field and the file, so a stage can turn it into a
per-row error instead of failing its batch.
"""
from __future__ import annotations

import hashlib
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from udfs import io as uio
from udfs.rows import InputError

__all__ = ["load_image", "encode_png", "describe_source"]


def describe_source(value) -> str:
    """Short human description of an image cell for error messages (a path, or ``<N bytes>``)."""
    if isinstance(value, dict):
        return str(value.get("path") or describe_source(value.get("bytes")))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return f"<{value.size} bytes>"
    return str(value)


def _raw_bytes(value, row_id: str, field: str) -> tuple[bytes, str]:
    if isinstance(value, dict):  # HF datasets {"bytes", "path"}
        if value.get("bytes") is not None:
            return _raw_bytes(value["bytes"], row_id, field)
        value = value.get("path")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise InputError(row_id, field, "no image (value is null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return data, f"<{len(data)} bytes>"
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        data = value.tobytes()
        return data, f"<{len(data)} bytes>"
    if isinstance(value, str):
        if not value.strip():
            raise InputError(row_id, field, "no image (empty path)")
        try:
            return uio.read_bytes(value), value
        except FileNotFoundError:
            raise InputError(row_id, field, f"image file not found: {value}") from None
        except (OSError, ValueError) as exc:
            raise InputError(row_id, field, f"cannot read image file {value}: {type(exc).__name__}: {exc}") from None
    raise InputError(row_id, field, f"unsupported image value of type {type(value).__name__}")


def load_image(value, row_id: str, field: str = "image") -> Image.Image:
    """Decode one image cell into an RGB ``PIL.Image.Image``.

    Args:
        value: path/URI string, encoded bytes (bytes, bytearray, memoryview, 1-D uint8
            array) or an HF-datasets ``{"bytes", "path"}`` dict. A ``PIL.Image`` is accepted
            as is (converted to RGB).
        row_id: the row's ``id`` (for the error message).
        field: the column name (for the error message).

    Returns:
        A fully decoded RGB image (``img.load()`` has run, so truncated files fail here and
        not later in a model). EXIF orientation is applied, so pixel coordinates (boxes)
        refer to the image as viewers display it. Palette/alpha images are converted with
        ``Image.convert("RGB")`` (alpha dropped, as the original scripts did).

    Raises:
        InputError: null/empty value, missing file, unreadable file, undecodable or
            truncated image, or a decompression-bomb-sized image; the message names the row,
            the field and the file (``row 'r1' field 'image': cannot decode image
            /data/x.jpg: ...``).
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data, source = _raw_bytes(value, row_id, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InputError(row_id, field, f"cannot decode image {source}: {type(exc).__name__}: {exc}") from None


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of ``img`` (deterministic: same pixels give the same bytes; zlib level 6)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def image_file_name(row_id: str) -> str:
    """``<id>.png``; ids with characters unsafe in file names/URIs get them replaced by ``_``
    plus an 8-hex hash of the raw id, so two ids never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._=-]", "_", row_id)
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)  # no hidden files, no ".."
    if safe != row_id or safe in ("", ".", ".."):
        safe = f"{safe}-{hashlib.sha256(row_id.encode()).hexdigest()[:8]}"
    return f"{safe}.png"
