"""A small reader (and writer) of MetaImage files (``.mha`` / ``.mhd``), the format of STOIC's CT scans.

MetaImage is ITK's format: an ASCII header of ``Key = Value`` lines, ending
with ``ElementDataFile``, followed (``ElementDataFile = LOCAL``, the ``.mha``
case) by the raw voxels, optionally zlib-compressed. This module reads the
subset that CT archives use, so the benchmarks need no SimpleITK:

- ``ObjectType = Image``, ``NDims`` and ``DimSize`` (fastest axis first: x y z);
- ``ElementType``: one of :data:`ELEMENT_TYPES` (``MET_SHORT``, ``MET_USHORT``,
  ``MET_FLOAT``, ``MET_UCHAR``, ...), ``ElementNumberOfChannels = 1``;
- ``ElementSpacing`` (or ``ElementSize``), in the header's axis order;
- ``BinaryDataByteOrderMSB`` / ``ElementByteOrderMSB`` (``True`` = big endian);
- ``CompressedData`` (zlib or gzip stream), ``CompressedDataSize``;
- ``ElementDataFile``: ``LOCAL`` (data after the header) or the name of a raw
  file next to the header (``.mhd`` + ``.raw``); ``HeaderSize`` is honoured
  for such files. ``LIST`` (one file per slice) is not supported.

Other keys (``Offset``, ``TransformMatrix``, ``AnatomicalOrientation``, ...) are
ignored: the benchmarks only need the voxels and their spacing. Arrays are
returned in C order with the *slowest* axis first, ``[z, y, x]`` for a CT
(as ``SimpleITK.GetArrayFromImage`` does), and the spacing is reversed to match.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["ELEMENT_TYPES", "read_mha", "write_mha"]

ELEMENT_TYPES: Final[dict[str, str]] = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
"""MetaImage element types and their NumPy type codes (byte order added from the header)."""

_BYTE_ORDER_KEYS: Final[tuple[str, ...]] = ("binarydatabyteordermsb", "elementbyteordermsb")
_MAX_HEADER_LINES: Final[int] = 200


def _boolean(path: Path, key: str, value: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise ValueError(f"{path}: {key} = {value!r} is not True or False")


def _header(path: Path, data: bytes) -> tuple[dict[str, str], int]:
    """The header's ``{lower-case key: value}`` and the offset of the first data byte."""
    fields: dict[str, str] = {}
    position = 0
    for _ in range(_MAX_HEADER_LINES):
        end = data.find(b"\n", position)
        if end < 0:
            break
        line = data[position:end].decode("latin-1").strip()
        position = end + 1
        if not line:
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise ValueError(f"{path}: header line {line[:60]!r} is not 'Key = Value'; is this a MetaImage file?")
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return fields, position
    raise ValueError(
        f"{path}: no 'ElementDataFile = ...' line in the first {_MAX_HEADER_LINES} header lines; "
        "is this a MetaImage (.mha/.mhd) file?"
    )


def read_mha(path: str | Path) -> tuple[npt.NDArray[np.generic], tuple[float, ...]]:
    """Read a MetaImage file: the voxels and their spacing, both slowest axis first.

    Args:
        path: a ``.mha`` file (header and data in one file) or a ``.mhd`` header
            whose ``ElementDataFile`` names a raw file in the same folder.

    Returns:
        ``(array, spacing)``: an array of ``NDims`` dimensions in native byte
        order and the element type's dtype (``MET_SHORT`` -> int16, ...), shape
        ``DimSize`` reversed (``[z, y, x]`` for a CT); ``spacing`` per array axis
        (e.g. millimetres ``(dz, dy, dx)``), 1.0 where the header gives none.

    Raises:
        FileNotFoundError: when ``path`` or its raw data file does not exist.
        ValueError: naming the file, for a header that is not MetaImage, an
            unsupported element type or data file, or data of the wrong length.

    Example:
        >>> import tempfile, numpy as np
        >>> path = Path(tempfile.mkdtemp()) / "ct.mha"
        >>> write_mha(path, np.arange(24, dtype=np.int16).reshape(2, 3, 4), (2.5, 0.7, 0.7))
        >>> volume, spacing = read_mha(path)
        >>> volume.shape, volume.dtype, spacing
        ((2, 3, 4), dtype('int16'), (2.5, 0.7, 0.7))
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MetaImage file {path} not found")
    data = path.read_bytes()
    fields, start = _header(path, data)
    object_type = fields.get("objecttype", "Image")
    if object_type.lower() != "image":
        raise ValueError(f"{path}: ObjectType = {object_type!r}; only 'Image' is supported")
    try:
        dims = [int(v) for v in fields["dimsize"].split()]
        ndims = int(fields.get("ndims", str(len(dims))))
    except KeyError:
        raise ValueError(f"{path}: the header has no DimSize line") from None
    except ValueError:
        raise ValueError(f"{path}: NDims / DimSize {fields.get('dimsize')!r} are not integers") from None
    if len(dims) != ndims or ndims < 1 or min(dims) < 1:
        raise ValueError(f"{path}: DimSize = {fields['dimsize']!r} does not give NDims = {ndims} positive sizes")
    element = fields.get("elementtype", "")
    if element.upper() not in ELEMENT_TYPES:
        raise ValueError(f"{path}: ElementType = {element!r} is not supported; expected one of {sorted(ELEMENT_TYPES)}")
    channels = int(fields.get("elementnumberofchannels", "1"))
    if channels != 1:
        raise ValueError(f"{path}: ElementNumberOfChannels = {channels}; only single-channel images are supported")
    msb = next((_boolean(path, key, fields[key]) for key in _BYTE_ORDER_KEYS if key in fields), False)
    dtype = np.dtype((">" if msb else "<") + ELEMENT_TYPES[element.upper()])
    compressed = _boolean(path, "CompressedData", fields.get("compresseddata", "False"))

    data_file = fields["elementdatafile"]
    if data_file.upper() == "LIST" or "%" in data_file:
        raise ValueError(f"{path}: ElementDataFile = {data_file!r} (one file per slice) is not supported")
    if data_file.upper() == "LOCAL":
        payload = data[start:]
    else:
        raw = path.parent / data_file
        if not raw.is_file():
            raise FileNotFoundError(f"{path}: its ElementDataFile {raw} not found")
        payload = raw.read_bytes()
        header_size = int(fields.get("headersize", "0"))
        payload = payload[len(payload) - math.prod(dims) * dtype.itemsize :] if header_size == -1 else payload[header_size:]
    if compressed:
        if "compresseddatasize" in fields:
            payload = payload[: int(fields["compresseddatasize"])]
        try:
            payload = zlib.decompress(payload, zlib.MAX_WBITS | 32)  # zlib or gzip header
        except zlib.error as error:
            raise ValueError(f"{path}: CompressedData = True but the data is not a zlib stream ({error})") from None
    expected = math.prod(dims) * dtype.itemsize
    if len(payload) < expected:
        raise ValueError(
            f"{path}: {len(payload)} bytes of voxel data for DimSize {dims} of {element} ({expected} bytes); "
            "the file is truncated or its header is wrong"
        )
    array = np.frombuffer(payload, dtype=dtype, count=math.prod(dims)).reshape(dims[::-1])
    array = array.astype(dtype.newbyteorder("="), copy=True)
    spacing_text = fields.get("elementspacing", fields.get("elementsize"))
    spacing = tuple(float(v) for v in spacing_text.split()) if spacing_text else (1.0,) * ndims
    if len(spacing) != ndims:
        raise ValueError(f"{path}: ElementSpacing = {spacing_text!r} does not give NDims = {ndims} values")
    return array, spacing[::-1]


def write_mha(
    path: str | Path,
    array: npt.NDArray[np.generic],
    spacing: Sequence[float] | None = None,
    *,
    compress: bool = False,
    msb: bool = False,
) -> None:
    """Write ``array`` as a single-file MetaImage (``ElementDataFile = LOCAL``) that :func:`read_mha` reads back.

    Args:
        path: the ``.mha`` file to write.
        array: voxels, slowest axis first (``[z, y, x]``), of a dtype in :data:`ELEMENT_TYPES`.
        spacing: per array axis (``(dz, dy, dx)``); ``None`` writes 1.0 everywhere.
        compress: zlib-compress the voxel data (``CompressedData = True``).
        msb: store the voxels big endian (``BinaryDataByteOrderMSB = True``).

    Raises:
        ValueError: for an unsupported dtype or a spacing of the wrong length.
    """
    codes = {code: name for name, code in ELEMENT_TYPES.items()}
    code = array.dtype.kind + str(array.dtype.itemsize)
    if code not in codes or array.ndim < 1:
        raise ValueError(f"array has dtype {array.dtype} and {array.ndim} dims; use one of {sorted(codes)} with ndim >= 1")
    spacing = [1.0] * array.ndim if spacing is None else [float(s) for s in spacing]
    if len(spacing) != array.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for an array of {array.ndim} dims")
    voxels = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">" if msb else "<")).tobytes()
    if compress:
        voxels = zlib.compress(voxels)
    lines = [
        "ObjectType = Image",
        f"NDims = {array.ndim}",
        "BinaryData = True",
        f"BinaryDataByteOrderMSB = {msb}",
        f"CompressedData = {compress}",
        *([f"CompressedDataSize = {len(voxels)}"] if compress else []),
        f"ElementSpacing = {' '.join(repr(s) for s in spacing[::-1])}",
        f"DimSize = {' '.join(str(d) for d in array.shape[::-1])}",
        f"ElementType = {codes[code]}",
        "ElementDataFile = LOCAL",
    ]
    Path(path).expanduser().write_bytes(("\n".join(lines) + "\n").encode("ascii") + voxels)
