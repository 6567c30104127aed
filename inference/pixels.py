"""Safe pixel decoding: size check before decoding, then LUT chain to display values.

The chain follows DICOM PS3.3 C.11 (Modality LUT, VOI LUT) and C.7.6.3.1.2
(Photometric Interpretation): stored values -> modality values -> VOI
(window or LUT) -> presentation in [0, 1] where 1 is white, MONOCHROME1
inverted so that bone is always bright.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array

from .errors import BadInput, SkipInput

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DEFAULT_MAX_PIXEL_BYTES = 1 << 30  # 1 GiB of decoded pixels

# Transfer syntaxes pydicom can decode with the codec plugins we install
# (pylibjpeg, openjpeg, pyjpegls, gdcm); others are refused by name.
_ENCAPSULATED_OK = {
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.JPEGLossless,
    pydicom.uid.JPEGLosslessSV1,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
    pydicom.uid.HTJ2KLossless,
    pydicom.uid.HTJ2KLosslessRPCL,
    pydicom.uid.HTJ2K,
    pydicom.uid.RLELossless,
}


# PS3.3 C.7.6.3.1.2 (and retired terms): colour photometric interpretations.
_COLOUR_TERMS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420",
                 "YBR_ICT", "YBR_RCT", "PALETTE COLOR", "HSV", "ARGB", "CMYK", "XYB"}


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError) as exc:
        # Our words, never the value: a hostile file can put anything there.
        raise BadInput(f"NumberOfFrames is not a valid integer ({type(exc).__name__})") from exc


def decoded_size(ds: Dataset) -> int:
    """Bytes the decoded pixel data will take, from the header alone.

    Raises BadInput when the image attributes needed are missing or absurd.
    """
    keyword = "Rows"
    try:
        rows = int(ds.Rows)
        keyword = "Columns"
        cols = int(ds.Columns)
        keyword = "BitsAllocated"
        bits = int(ds.BitsAllocated)
        keyword = "SamplesPerPixel"
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        # The keyword, never the exception's text: it may quote the value.
        raise BadInput(f"image pixel module incomplete or invalid: {keyword} "
                       f"({type(exc).__name__})") from exc
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32, 64) or samples not in (1, 3):
        raise BadInput(
            f"invalid image geometry Rows={rows} Columns={cols} "
            f"BitsAllocated={bits} SamplesPerPixel={samples}"
        )
    return rows * cols * frame_count(ds) * samples * max(bits, 8) // 8


def check_decodable(ds: Dataset, max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES) -> None:
    """Refuse, before decoding, what we cannot or must not decode."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise SkipInput("float pixel data is not supported by any model")
        if "Rows" in ds and "Columns" in ds:
            raise BadInput("image without its pixel data (truncated file?)")
        raise SkipInput("no pixel data")
    size = decoded_size(ds)
    if size > max_pixel_bytes:
        raise BadInput(
            f"decoded image would take {size / 2**20:.0f} MiB, over the "
            f"{max_pixel_bytes / 2**20:.0f} MiB cap (MaxPixelBytes)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in MONOCHROME:
        # A defined term is shown; anything else is the file's text: not quoted.
        shown = photometric if photometric in _COLOUR_TERMS else (
            "an unrecognised PhotometricInterpretation" if photometric
            else "no PhotometricInterpretation")
        raise SkipInput(f"colour image ({shown}) not supported")
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsuid is not None and tsuid.is_compressed and tsuid not in _ENCAPSULATED_OK:
        raise SkipInput(f"transfer syntax {tsuid.name} ({tsuid}) cannot be decoded")
    if tsuid is None or not tsuid.is_compressed:
        expected = int(ds.Rows) * int(ds.Columns) * frame_count(ds) * int(ds.BitsAllocated)
        have = len(ds.PixelData) * 8
        if have < expected:
            raise BadInput(
                f"pixel data truncated: {have // 8} bytes for {expected // 8} expected"
            )


def decode_frame(
    ds: Dataset, index: int = 0, max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
) -> np.ndarray:
    """Stored values of one frame as an integer or float array (rows, columns)."""
    check_decodable(ds, max_pixel_bytes)
    n = frame_count(ds)
    if not 0 <= index < n:
        raise BadInput(f"frame {index} requested, image has {n}")
    try:
        arr = pixel_array(ds, index=index if n > 1 else None)
    except Exception as exc:  # codecs raise anything from ValueError to RuntimeError
        arr = _decode_with_dcmtk(ds, index if n > 1 else None)
        if arr is None:
            # A codec's message may quote header values: name the codec's
            # exception type and the transfer syntax only.
            tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            raise BadInput(f"pixel data cannot be decoded ({type(exc).__name__}, transfer "
                           f"syntax {tsuid or 'missing'})") from exc
    if arr.ndim != 2:
        raise BadInput(f"decoded frame has shape {arr.shape}, expected (rows, columns)")
    return _fix_bits_stored(arr, ds)


# dcmtk's decompressors tolerate some encoder quirks of real modalities (e.g.
# sequential JPEG with odd SOS parameters) that pydicom's plugins refuse.
_DCMTK_DECODERS = {
    pydicom.uid.JPEGBaseline8Bit: "dcmdjpeg",
    pydicom.uid.JPEGExtended12Bit: "dcmdjpeg",
    pydicom.uid.JPEGLossless: "dcmdjpeg",
    pydicom.uid.JPEGLosslessSV1: "dcmdjpeg",
    pydicom.uid.JPEGLSLossless: "dcmdjpls",
    pydicom.uid.JPEGLSNearLossless: "dcmdjpls",
    pydicom.uid.RLELossless: "dcmdrle",
}


def _decode_with_dcmtk(ds: Dataset, index: int | None) -> np.ndarray | None:
    """Second opinion from dcmtk for a compressed frame pydicom could not decode."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    tool = shutil.which(_DCMTK_DECODERS.get(tsuid, "")) if tsuid else None
    if tool is None:
        return None
    with tempfile.TemporaryDirectory(prefix="orthanc-ai-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        try:
            ds.save_as(src, enforce_file_format=True)
            proc = subprocess.run([tool, str(src), str(dst)], capture_output=True, timeout=120)
            if proc.returncode != 0 or not dst.exists():
                return None
            return pixel_array(pydicom.dcmread(dst), index=index)
        except Exception:
            return None


def _fix_bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Clear junk above BitsStored (and sign-extend signed pixels) for native data."""
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    if arr.dtype.kind not in "iu" or bits_stored >= bits_alloc or bits_stored <= 0:
        return arr
    mask = (1 << bits_stored) - 1
    unsigned = arr.astype(np.int64) & mask
    if int(ds.get("PixelRepresentation", 0)) == 1:
        sign = 1 << (bits_stored - 1)
        unsigned = np.where(unsigned & sign, unsigned - (1 << bits_stored), unsigned)
    return unsigned.astype(np.int32)


def padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """True where the stored value is padding: PixelPaddingValue, up to
    PixelPaddingRangeLimit when present (outside the exposed area or the
    reconstruction circle)."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, bytes):
        return np.zeros(stored.shape, dtype=bool)
    lo, hi = sorted((int(pad), int(ds.get("PixelPaddingRangeLimit", pad))))
    return (stored >= lo) & (stored <= hi)


def to_presentation(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Modality LUT, VOI and photometric inversion.

    The first VOI (LUT item or window preset) is used, as a viewer shows it
    by default. Without any VOI the 0.5-99.5 percentiles of the exposed area
    span the output.

    Returns
    -------
    display : float32 array in [0, 1], 1 = white (bone on a radiograph)
    valid : bool array, False on PixelPaddingValue (outside the exposed area)
    """
    valid = ~padding_mask(stored, ds)
    try:
        modality = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except Exception as exc:
        raise BadInput(f"Modality LUT cannot be applied ({type(exc).__name__})") from exc
    display = _apply_voi(modality, ds, valid)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        display = 1.0 - display
    display[~valid] = 0.0
    return display.astype(np.float32), valid


def _first(value: object) -> float:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _apply_voi(x: np.ndarray, ds: Dataset, valid: np.ndarray) -> np.ndarray:
    """VOI per PS3.3 C.11.2.1.2, normalised to [0, 1]."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        try:
            lut = np.asarray(apply_voi(x, ds, index=0), dtype=np.float32)
            data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float32)
        except Exception as exc:
            raise BadInput(f"VOI LUT cannot be applied ({type(exc).__name__})") from exc
        lo, hi = float(data.min()), float(data.max())
        return np.clip((lut - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    center = width = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center = width = None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if center is not None and width is not None and width > 0:
        if function == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
        if function == "LINEAR_EXACT":
            return np.clip((x - center) / width + 0.5, 0.0, 1.0)
        if width >= 1:  # LINEAR, PS3.3 C.11.2.1.2.1
            return np.clip((x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)
    values = x[valid] if valid.any() else x.ravel()
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
