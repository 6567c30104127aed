"""Model cards: what a model is, accepts, needs and returns, and how well it did.

A card is ``model.json`` in the model's folder. It is parsed into frozen
dataclasses; once ``ModelCard.from_json`` returns, the card is valid. Errors
name the folder and the key, so that an admin who drops a model folder in
knows what to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .features import FEATURES


class CardError(ValueError):
    """A model folder or card that cannot be used, with the reason."""


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme, meaning), e.g. SNOMED CT."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ImageInput:
    name: str
    shape: tuple[int, int, int]
    pixel_spacing_mm: float
    preprocessing: str
    # CT: fixed Hounsfield windows (centre, width), one per channel; None for
    # radiographs, which use the image's own VOI.
    windows: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class MetadataInput:
    name: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class Accepts:
    level: str  # "instance" (one image) or "series" (a volume)
    modalities: tuple[str, ...]
    photometric: tuple[str, ...]
    body_parts: tuple[str, ...]


@dataclass(frozen=True)
class ModelCard:
    folder: Path
    id: str
    name: str
    version: str
    description: str
    intended_use: str
    format: str  # "keras" or "savedmodel"
    weights: Path
    accepts: Accepts
    image: ImageInput
    metadata: MetadataInput | None
    probability_output: str
    heatmap_output: str | None
    heatmap_stride: int
    finding: Code
    finding_site: Code | None
    threshold: float
    # Series-level models: threshold on the maximum slice probability, and the
    # heatmap level that counts a cell into the finding's volume.
    series_threshold: float | None = None
    volume_heatmap_threshold: float | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, folder: Path) -> ModelCard:
        path = folder / "model.json"
        if not path.is_file():
            raise CardError(f"{folder}: no model.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CardError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_json(data, folder)

    @classmethod
    def from_json(cls, data: Any, folder: Path) -> ModelCard:
        r = _Reader(data, f"{folder}/model.json")
        if r.get("schema", int) != 1:
            raise CardError(f"{r.where}: 'schema' must be 1")
        fmt = r.get("format", str)
        if fmt not in ("keras", "savedmodel"):
            raise CardError(f"{r.where}: 'format' must be 'keras' or 'savedmodel', not {fmt!r}")
        weights = folder / r.get("weights", str)
        if not weights.exists():
            raise CardError(f"{r.where}: 'weights' file {weights.name!r} not found in {folder}")
        acc = r.sub("accepts")
        level = acc.get("level", str)
        if level not in ("instance", "series"):
            raise CardError(f"{acc.where}: 'level' must be 'instance' or 'series'")
        accepts = Accepts(
            level=level,
            modalities=tuple(m.upper() for m in acc.get("modalities", list)),
            photometric=tuple(acc.opt("photometric", list, ["MONOCHROME1", "MONOCHROME2"])),
            body_parts=tuple(b.upper() for b in acc.opt("body_parts", list, [])),
        )
        if not accepts.modalities:
            raise CardError(f"{acc.where}: 'modalities' must list at least one modality")
        inputs = r.sub("inputs")
        img = inputs.sub("image")
        shape = img.get("shape", list)
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise CardError(f"{img.where}: 'shape' must be [rows, columns, channels]")
        spacing = float(img.get("pixel_spacing_mm", (int, float)))
        if not 0.01 <= spacing <= 20:
            raise CardError(f"{img.where}: 'pixel_spacing_mm' out of range: {spacing}")
        windows = None
        if "windows" in img.data:
            raw = img.get("windows", list)
            ok = all(isinstance(w, list) and len(w) == 2 and w[1] > 0 for w in raw)
            if not ok or len(raw) != shape[2]:
                raise CardError(
                    f"{img.where}: 'windows' must list one [centre, width] per channel"
                )
            windows = tuple((float(c), float(w)) for c, w in raw)
        image = ImageInput(
            img.get("name", str), tuple(shape), spacing, img.opt("preprocessing", str, ""),
            windows,
        )
        metadata = None
        if "metadata" in inputs.data:
            md = inputs.sub("metadata")
            names = tuple(md.get("features", list))
            unknown = [n for n in names if n not in FEATURES]
            if unknown:
                raise CardError(
                    f"{md.where}: unknown feature(s) {unknown}; known: {sorted(FEATURES)}"
                )
            metadata = MetadataInput(md.get("name", str), names)
        outputs = r.sub("outputs")
        prob = outputs.sub("probability")
        heat_name, stride = None, 1
        if "heatmap" in outputs.data:
            heat = outputs.sub("heatmap")
            heat_name = heat.get("name", str)
            stride = heat.get("stride", int)
        threshold = float(r.get("threshold", (int, float)))
        if not 0.0 < threshold < 1.0:
            raise CardError(f"{r.where}: 'threshold' must be between 0 and 1")
        site = r.sub("finding_site").code() if "finding_site" in r.data else None
        series_threshold = None
        if "series_threshold" in r.data:
            series_threshold = float(r.get("series_threshold", (int, float)))
            if not 0.0 < series_threshold < 1.0:
                raise CardError(f"{r.where}: 'series_threshold' must be between 0 and 1")
        volume_level = None
        if "volume" in r.data:
            volume_level = float(r.sub("volume").get("heatmap_threshold", (int, float)))
        if level == "series" and heat_name is None:
            raise CardError(f"{r.where}: a series-level model needs a 'heatmap' output")
        return cls(
            folder=folder,
            id=_identifier(r.get("id", str), r.where),
            name=r.get("name", str),
            version=r.get("version", str),
            description=r.opt("description", str, ""),
            intended_use=r.get("intended_use", str),
            format=fmt,
            weights=weights,
            accepts=accepts,
            image=image,
            metadata=metadata,
            probability_output=prob.get("name", str),
            heatmap_output=heat_name,
            heatmap_stride=stride,
            finding=r.sub("finding").code(),
            finding_site=site,
            threshold=threshold,
            series_threshold=series_threshold,
            volume_heatmap_threshold=volume_level,
            training=r.opt("training", dict, {}),
            metrics=r.opt("metrics", dict, {}),
            raw=data,
        )

    def summary(self) -> dict[str, Any]:
        """What ``GET /ai/models`` shows."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "intended_use": self.intended_use,
            "accepts": {
                "level": self.accepts.level,
                "modalities": list(self.accepts.modalities),
                "photometric": list(self.accepts.photometric),
                "body_parts": list(self.accepts.body_parts),
            },
            "inputs": self.raw.get("inputs", {}),
            "outputs": self.raw.get("outputs", {}),
            "finding": self.raw.get("finding", {}),
            "threshold": self.threshold,
            "training": self.training,
            "metrics": self.metrics,
        }


def _identifier(value: str, where: str) -> str:
    ok = value and all(ch.isalnum() or ch in "-_." for ch in value)
    if not ok:
        raise CardError(f"{where}: 'id' must use letters, digits, '-', '_' or '.'")
    return value


class _Reader:
    """Typed access to a JSON object that names the key when it is wrong."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise CardError(f"{where}: expected an object")
        self.data = data
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.data:
            raise CardError(f"{self.where}: missing key '{key}'")
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CardError(f"{self.where}: key '{key}' has the wrong type")
        if isinstance(value, str) and not value.strip():
            raise CardError(f"{self.where}: key '{key}' is empty")
        return value

    def opt(self, key: str, kind: type, default: Any) -> Any:
        return self.get(key, kind) if key in self.data else default

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), f"{self.where}:{key}")

    def code(self) -> Code:
        return Code(self.get("value", str), self.get("scheme", str), self.get("meaning", str))
