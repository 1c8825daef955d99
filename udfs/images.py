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

__all__ = ["load_image", "load_image_ref", "encode_png", "describe_source", "bounded", "image_data_url"]


def describe_source(value) -> str:
    """Short human description of an image cell for error messages (a path, or ``<N bytes>``)."""
    if isinstance(value, dict):
        return str(value.get("path") or describe_source(value.get("bytes")))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return f"<{value.size} bytes>"
    return str(value)


def image_bytes(value, row_id: str, field: str = "image") -> tuple[bytes, str]:
    """``(encoded bytes, source)`` of an image cell (the forms ``load_image`` accepts, PIL
    images excepted), read once; ``source`` names the file (or ``<N bytes>``) for messages.
    Raises ``InputError`` naming the row and field like ``load_image``."""
    return _raw_bytes(value, row_id, field)


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
    return decode_image(*_raw_bytes(value, row_id, field), row_id, field)


def decode_image(data: bytes, source: str, row_id: str, field: str = "image") -> Image.Image:
    """``load_image`` for bytes already read (``image_bytes``): the message names ``source``."""
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


def _decode_data_url(url: str, row_id: str, field: str) -> bytes:
    """Bytes of a ``data:<mime>;base64,<payload>`` URL. Raises ``InputError``."""
    import base64
    import binascii

    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise InputError(row_id, field, f"unsupported data URL (expected base64): {url[:40]}...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(row_id, field, f"data URL is not valid base64: {exc}") from None


def load_image_ref(ref, row_id: str, field: str = "image") -> Image.Image:
    """``load_image`` that also accepts a ``data:image/...;base64,...`` URL (OpenAI image parts)."""
    if isinstance(ref, str) and ref.startswith("data:"):
        return load_image(_decode_data_url(ref, row_id, field), row_id, field)
    return load_image(ref, row_id, field)


def bounded(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` shrunk (aspect kept, Lanczos) so that its longer side is at most ``max_side`` px;
    returned unchanged when it already fits. Raises ``ValueError`` for ``max_side < 1``."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def image_data_url(ref, row_id: str, field: str = "image", max_side: int = 1024, image_format: str = "auto",
                   jpeg_quality: int = 90) -> str:
    """Base64 data URL of an image, re-encoded at a bounded size for an API request.

    Args:
        ref: anything ``load_image_ref`` takes (path/URI, bytes, data URL, PIL image).
        max_side: longest side in pixels after re-encoding (aspect kept; never upscaled).
        image_format: ``png``, ``jpeg`` or ``auto`` — encode both and keep the smaller: JPEG
            wins on photos, PNG on flat charts and diagrams (notes/mmgen-vlm.md §6 measured a
            336 px photo at 206 KB PNG vs 40 KB JPEG q90, flat shapes at 1.7 KB PNG vs 6.8 KB JPEG).
        jpeg_quality: JPEG quality 1-95 (default 90, as in that measurement).

    Returns:
        ``"data:image/png;base64,..."`` or ``"data:image/jpeg;base64,..."``.

    Raises:
        InputError: the image cannot be read or decoded (names row, field and file).
        ValueError: unknown ``image_format``.
    """
    import base64

    if image_format not in ("auto", "png", "jpeg"):
        raise ValueError(f"image_format must be auto, png or jpeg, got {image_format!r}")
    img = bounded(load_image_ref(ref, row_id, field), max_side)
    candidates = []
    if image_format in ("auto", "png"):
        candidates.append(("image/png", encode_png(img)))
    if image_format in ("auto", "jpeg"):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(jpeg_quality))
        candidates.append(("image/jpeg", buf.getvalue()))
    mime, data = min(candidates, key=lambda c: len(c[1]))
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
