"""From a pydicom dataset to the arrays a model takes, and back to image coordinates.

A projection radiograph goes through: safe decode -> Modality LUT -> VOI ->
MONOCHROME1 inversion -> resampling to the card's physical pixel size ->
centring on the model's canvas. The ``Geometry`` kept alongside maps model
pixels back to the source image so that findings land where they belong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from .features import FEATURE_NEEDS, Metadata, extract_metadata, feature_vector
from .pixels import DEFAULT_MAX_PIXEL_BYTES, decode_frame, padding_mask, to_presentation

if TYPE_CHECKING:
    from .card import ModelCard


@dataclass(frozen=True)
class Geometry:
    """Affine map from model canvas to source pixels (continuous coordinates).

    Continuous coordinates put (0, 0) at the top-left corner of the top-left
    pixel, as DICOM SCOORD pixel coordinates do (PS3.3 C.18.6.1.1):
    ``source = (model + offset) * scale`` per axis.
    """

    scale_row: float
    scale_col: float
    offset_row: float
    offset_col: float
    source_rows: int
    source_cols: int

    def to_source(self, row: float, col: float) -> tuple[float, float]:
        r = (row + self.offset_row) * self.scale_row
        c = (col + self.offset_col) * self.scale_col
        return (
            float(min(max(r, 0.0), self.source_rows)),
            float(min(max(c, 0.0), self.source_cols)),
        )

    def to_model(self, row: float, col: float) -> tuple[float, float]:
        """Inverse of ``to_source`` (not clipped: may fall outside the canvas)."""
        return row / self.scale_row - self.offset_row, col / self.scale_col - self.offset_col


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # (rows, cols) or (rows, cols, channels) float32 in [0, 1]
    geometry: Geometry
    notes: tuple[str, ...]  # policies applied, e.g. missing spacing


@dataclass(frozen=True)
class ModelInput:
    image: PreparedImage
    metadata: Metadata
    features: np.ndarray  # (n,) float32, in the card's order
    missing_inputs: tuple[str, ...]  # metadata the model wanted but did not get


def resample(display: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """Antialiased bilinear resampling (Pillow's filter support scales when shrinking)."""
    if display.shape == (out_rows, out_cols):
        return display.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(display, dtype=np.float32), mode="F")
    return np.asarray(img.resize((out_cols, out_rows), Image.Resampling.BILINEAR), np.float32)


def fit_canvas(
    display: np.ndarray,
    spacing_mm: tuple[float, float] | None,
    target_mm: float,
    canvas: tuple[int, int],
) -> PreparedImage:
    """Resample to ``target_mm`` per pixel and centre on a ``canvas`` (crop or pad with 0)."""
    rows, cols = display.shape
    notes: list[str] = []
    if spacing_mm is not None:
        out_r = max(1, round(rows * spacing_mm[0] / target_mm))
        out_c = max(1, round(cols * spacing_mm[1] / target_mm))
    else:
        # Without a physical size, the whole image is fitted into the canvas
        # keeping its aspect ratio. Documented in docs/inputs.md.
        k = max(rows / canvas[0], cols / canvas[1])
        out_r, out_c = max(1, round(rows / k)), max(1, round(cols / k))
        notes.append("pixel spacing missing: image scaled to fit the model input")
    small = resample(display, out_r, out_c)
    h, w = canvas
    off_r, off_c = (out_r - h) // 2, (out_c - w) // 2
    out = np.zeros(canvas, np.float32)
    src_r0, dst_r0 = max(off_r, 0), max(-off_r, 0)
    src_c0, dst_c0 = max(off_c, 0), max(-off_c, 0)
    n_r, n_c = min(h - dst_r0, out_r - src_r0), min(w - dst_c0, out_c - src_c0)
    out[dst_r0 : dst_r0 + n_r, dst_c0 : dst_c0 + n_c] = small[
        src_r0 : src_r0 + n_r, src_c0 : src_c0 + n_c
    ]
    if off_r > 0 or off_c > 0:
        notes.append("image larger than the model field: centre cropped")
    geometry = Geometry(rows / out_r, cols / out_c, off_r, off_c, rows, cols)
    return PreparedImage(out, geometry, tuple(notes))


def _model_input(image: PreparedImage, meta: Metadata, names: tuple[str, ...]) -> ModelInput:
    """Features in the card's order, and which of the metadata they need was missing."""
    features = np.asarray(feature_vector(meta, names), np.float32)
    wanted = {FEATURE_NEEDS.get(name) for name in names}
    missing = tuple(m for m in meta.missing if m in wanted or m == "pixel_spacing")
    return ModelInput(image, meta, features, missing)


def hu_windows(hu: np.ndarray, windows: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Hounsfield units to one [0, 1] channel per (centre, width) window."""
    out = np.empty((*hu.shape, len(windows)), np.float32)
    for i, (centre, width) in enumerate(windows):
        out[..., i] = np.clip((hu - (centre - width / 2.0)) / width, 0.0, 1.0)
    return out


def prepare_ct_slice(
    ds: Dataset,
    *,
    canvas: tuple[int, int],
    target_mm: float,
    windows: tuple[tuple[float, float], ...],
    feature_names: tuple[str, ...],
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES,
) -> ModelInput:
    """One CT slice: Hounsfield units (Modality LUT), fixed windows as channels.

    The VOI window stored in the image is ignored: it varies by site and
    scanner, whereas the model was trained on fixed HU windows.
    """
    from pydicom.pixels import apply_modality_lut

    meta = extract_metadata(ds)
    stored = decode_frame(ds, 0, max_pixel_bytes)
    hu = np.asarray(apply_modality_lut(stored, ds), np.float32)
    hu[padding_mask(stored, ds)] = -1024.0  # outside the reconstruction circle: air
    channels = hu_windows(hu, windows)
    planes = [fit_canvas(channels[..., i], meta.pixel_spacing_mm, target_mm, canvas)
              for i in range(len(windows))]
    pixels = np.stack([p.pixels for p in planes], axis=-1)
    image = PreparedImage(pixels, planes[0].geometry, planes[0].notes)
    return _model_input(image, meta, feature_names)


def prepare_radiograph(
    ds: Dataset,
    *,
    canvas: tuple[int, int],
    target_mm: float,
    feature_names: tuple[str, ...],
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES,
    frame: int = 0,
) -> ModelInput:
    """Everything a 2D projection model needs from one instance."""
    meta = extract_metadata(ds)
    stored = decode_frame(ds, frame, max_pixel_bytes)
    display, _ = to_presentation(stored, ds)
    image = fit_canvas(display, meta.pixel_spacing_mm, target_mm, canvas)
    return _model_input(image, meta, feature_names)


def radiograph_input(card: ModelCard, ds: Dataset, *, max_pixel_bytes: int) -> ModelInput:
    """A radiograph prepared as ``card`` takes it (its canvas, spacing, features)."""
    rows, cols, _ = card.image.shape
    return prepare_radiograph(ds, canvas=(rows, cols), target_mm=card.image.pixel_spacing_mm,
                              feature_names=card.metadata.features if card.metadata else (),
                              max_pixel_bytes=max_pixel_bytes)


def ct_slice_input(card: ModelCard, ds: Dataset, *, max_pixel_bytes: int) -> ModelInput:
    """One CT slice prepared as ``card`` takes it (its windows; soft tissue by default)."""
    rows, cols, _ = card.image.shape
    return prepare_ct_slice(ds, canvas=(rows, cols), target_mm=card.image.pixel_spacing_mm,
                            windows=card.image.windows or ((40.0, 80.0),),
                            feature_names=card.metadata.features if card.metadata else (),
                            max_pixel_bytes=max_pixel_bytes)
