"""Model cards: what a model is, accepts, needs and returns, and how well it did.

A card is ``model.json`` in the model's folder. Its schema is declared with
pydantic models; once ``ModelCard.from_json`` returns, the card is valid.
Errors name the folder and the key, so that an admin who drops a model folder
in knows what to fix. Keys a card carries beyond the schema (notes, units)
are kept in ``raw`` and otherwise ignored.

The helpers ``says`` and ``explain`` word the errors of every schema of the
project (cards, ``AI`` section, routing rules) alike: "<key> must be ..., not X".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from .features import FEATURES


class CardError(ValueError):
    """A model folder or card that cannot be used, with the reason."""


def says(message: str, test: Callable[[Any], bool] = lambda _: True) -> WrapValidator:
    """Validation by the annotated type, then ``test``; any failure reads ``message``.

    For values whose item-by-item complaints would say less than one sentence.
    """

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            value = handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid", message) from None
        if not test(value):
            raise PydanticCustomError("invalid", message)
        return value

    return WrapValidator(validate)


_PHRASES = {
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
}


def explain(error: ErrorDetails) -> str:
    """What is wrong with the value at ``error['loc']``: "must be ..., not X"."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "missing":
        return "is required"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind in ("too_short", "too_long"):
        bound = "least" if kind == "too_short" else "most"
        text = f"must have at {bound} {ctx.get('min_length', ctx.get('max_length'))} item(s)"
    else:  # pydantic's "Input should be ..." and our own "must ..."
        text = _PHRASES.get(kind) or re.sub(r"^\w+ should", "must", error["msg"])
    value = error.get("input")
    if not isinstance(value, dict):
        shown = repr(value)
        text += f", not {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return text


Text = Annotated[StrictStr, StringConstraints(strip_whitespace=True, min_length=1)]
Upper = Annotated[Text, StringConstraints(to_upper=True)]
Fraction = Annotated[StrictFloat, Field(gt=0, lt=1)]
_ONE_WINDOW = "must list one [centre, width] per channel"


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True)


class Code(_Part):
    """A coded concept (value, scheme, meaning), e.g. SNOMED CT."""

    value: Text
    scheme: Text
    meaning: Text


class ImageInput(_Part):
    name: Text
    shape: Annotated[tuple[StrictInt, StrictInt, StrictInt],
                     says("must be [rows, columns, channels]", lambda s: min(s) > 0)]
    pixel_spacing_mm: Annotated[StrictFloat, Field(ge=0.01, le=20)]
    preprocessing: Text = ""
    # CT: fixed Hounsfield windows (centre, width), one per channel; None for
    # radiographs, which use the image's own VOI.
    windows: Annotated[tuple[tuple[StrictFloat, Annotated[StrictFloat, Field(gt=0)]], ...],
                       says(_ONE_WINDOW)] | None = None

    @field_validator("windows")
    @classmethod
    def _one_per_channel(cls, windows: Any, info: ValidationInfo) -> Any:
        shape = info.data.get("shape")
        if windows is not None and shape is not None and len(windows) != shape[2]:
            raise PydanticCustomError("invalid", _ONE_WINDOW)
        return windows


_Feature = Annotated[StrictStr, says(f"must be a known feature ({', '.join(sorted(FEATURES))})",
                                     FEATURES.__contains__)]


class MetadataInput(_Part):
    name: Text
    features: tuple[_Feature, ...]


class Accepts(_Part):
    level: Literal["instance", "series"]  # one image, or a volume
    modalities: Annotated[tuple[Upper, ...], Field(min_length=1)]
    photometric: tuple[Text, ...] = ("MONOCHROME1", "MONOCHROME2")
    body_parts: tuple[Upper, ...] = ()


class _Named(_Part):
    name: Text


class _Heatmap(_Named):
    stride: Annotated[StrictInt, Field(gt=0)]


class _Inputs(_Part):
    image: ImageInput
    metadata: MetadataInput | None = None


class _Outputs(_Part):
    probability: _Named
    heatmap: _Heatmap | None = None


class _Volume(_Part):
    heatmap_threshold: StrictFloat


class _Card(_Part):
    """``model.json`` as it is written."""

    schema_version: Annotated[StrictInt, Field(alias="schema"),
                              says("must be 1", lambda v: v == 1)]
    id: Annotated[Text, says("must use letters, digits, '-', '_' or '.'",
                             lambda v: re.fullmatch(r"[\w.-]+", v) is not None)]
    name: Text
    version: Text
    description: Text = ""
    intended_use: Text
    format: Literal["keras", "savedmodel"]
    weights: Text
    accepts: Accepts
    inputs: _Inputs
    outputs: _Outputs
    finding: Code
    finding_site: Code | None = None
    threshold: Fraction
    series_threshold: Fraction | None = None
    volume: _Volume | None = None
    training: dict[str, Any] = {}
    metrics: dict[str, Any] = {}

    @model_validator(mode="after")
    def _series_needs_heatmap(self) -> _Card:
        if self.accepts.level == "series" and self.outputs.heatmap is None:
            raise PydanticCustomError("invalid", "a series-level model needs a 'heatmap' output")
        return self


def _card_error(exc: ValidationError, where: str) -> CardError:
    """``<folder>/model.json:inputs:image: 'shape' must be ...``, one per problem."""
    problems = []
    for error in exc.errors():
        keys: list[str] = []
        for part in error["loc"]:
            if isinstance(part, int):
                keys[-1] += f"[{part}]"
            else:
                keys.append(part)
        head = ":".join([where, *keys[:-1]])
        if not keys:
            problems.append(f"{where}: {error['msg']}")
        elif error["type"] == "missing":
            problems.append(f"{head}: missing key '{keys[-1]}'")
        else:
            problems.append(f"{head}: '{keys[-1]}' {explain(error)}")
    return CardError("; ".join(problems))


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
        where = f"{folder}/model.json"
        if not isinstance(data, dict):
            raise CardError(f"{where}: expected an object")
        try:
            card = _Card.model_validate(data)
        except ValidationError as exc:
            raise _card_error(exc, where) from exc
        weights = folder / card.weights
        if not weights.exists():
            raise CardError(f"{where}: 'weights' file {weights.name!r} not found in {folder}")
        heatmap, volume = card.outputs.heatmap, card.volume
        return cls(**{
            **{key: value for key, value in card if key in cls.__dataclass_fields__},
            "folder": folder,
            "weights": weights,
            "image": card.inputs.image,
            "metadata": card.inputs.metadata,
            "probability_output": card.outputs.probability.name,
            "heatmap_output": heatmap.name if heatmap else None,
            "heatmap_stride": heatmap.stride if heatmap else 1,
            "volume_heatmap_threshold": volume.heatmap_threshold if volume else None,
            "raw": data,
        })

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
