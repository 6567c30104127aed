"""Which models run on which images: declarative rules from the ``AI.Routing`` section.

For each model, the matching rule of highest priority decides: ``run`` or
``skip``. An image that no rule matches is skipped with the reason ``no rule
matched``, never an error. Before the rules, images a radiologist would not
want analysed are excluded by default: localizers and scouts, dose reports,
secondary captures and derived images.

A rule must stay within what its model's card accepts (modalities, level);
a rule that would send a model what it cannot take is refused at start-up.

The whole skip policy lives here: objects without an image (by SOP class,
before anything is downloaded), our own outputs (SOP class and
Manufacturer: an SR, KOS or GSPS we stored over REST has origin ``REST_API``
like any upload), the default exclusions, then the rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.alias_generators import to_pascal
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:  # pydicom loads every codec (GDCM too): not in Orthanc's process
    from pydicom.dataset import Dataset

from .card import ModelCard, Text, Upper, explain, says
from .errors import SkipInput
from .features import patient_age

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
OWN_MANUFACTURER = "orthanc-ai"  # Manufacturer of every SR, KOS and GSPS we write
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # SRs, and the KOS (.88.59)
PR_PREFIX = "1.2.840.10008.5.1.4.1.1.11."  # presentation states (our GSPS: .11.1)

# SOP Class UID prefixes of objects without an image to analyse; they are
# skipped from Orthanc's metadata alone, without downloading the file.
_NON_IMAGE_PREFIXES = (
    SR_PREFIX,  # structured reports, key object selection
    PR_PREFIX,  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL, ...
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms (ECG, audio, ...)
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, seg
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose ... RT plans, not RT Image (.481.1)
    "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7",
    "1.2.840.10008.5.1.4.1.1.481.8",
    "1.2.840.10008.5.1.4.1.1.481.9",
    "1.2.840.10008.5.1.1.",  # printing, basic film
)


def sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else f"SOP Class {uid}"


def non_image_reason(sop_class_uid: str) -> str | None:
    """Why an object of this SOP class has nothing to analyse, or None."""
    if sop_class_uid and sop_class_uid.startswith(_NON_IMAGE_PREFIXES):
        return f"non-image object ({sop_class_name(sop_class_uid)})"
    return None


def may_be_own_output(sop_class_uid: str) -> bool:
    """Only SRs, key object selections and presentation states can be ours (the SR
    and its companions, inference.presentation); whether it is, its Manufacturer says."""
    return sop_class_uid.startswith((SR_PREFIX, PR_PREFIX))


def is_own_output(sop_class_uid: str, manufacturer: str | None) -> bool:
    return may_be_own_output(sop_class_uid) and manufacturer == OWN_MANUFACTURER
_RECONSTRUCTED = {"MPR", "MIP", "MINIP", "REFORMATTED", "VOLUME_RENDER", "CURVED",
                  "PROJECTION IMAGE", "SUBTRACTION"}
_LOCALIZER_WORDS = re.compile(
    r"\b(scout|localizer|localiser|topogram|surview|scanogram|dose\s*(report|info)|"
    r"patient\s*protocol)\b",
    re.I,
)


class RoutingError(ValueError):
    """A routing rule that cannot be used; the message names the rule and key."""


FROM_JSON = {"from": "json"}  # validation context: keys as the JSON must write them


class Section(BaseModel):
    """A JSON object of the configuration: CamelCase keys, unknown ones refused.

    Validated with ``context=FROM_JSON``, only the CamelCase keys are valid;
    Python code may also construct it by field name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_pascal,
                              validate_by_name=True, str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            valid = sorted(f.alias or name for name, f in cls.model_fields.items())
            by_name = [] if info.context == FROM_JSON else list(cls.model_fields)
            unknown = sorted(set(data) - set(valid) - set(by_name))
            if unknown:
                raise PydanticCustomError("unknown_keys", "unknown key(s) {unknown}",
                                          {"unknown": unknown, "valid": ", ".join(valid)})
        return data


def describe(exc: ValidationError, root: str, data: Any = None) -> str:
    """``AI.Routing.Rules[2].Modality (rule 'CT head') must be ..., not X``, one per problem.

    ``data`` is what was validated: from it a rule's Name joins its index.
    """

    def where(loc: tuple[int | str, ...]) -> str:
        path = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
        node, name = data, None
        for part in (None, *loc):
            try:
                node = node if part is None else node[part]
            except (KeyError, IndexError, TypeError):
                break
            label = node.get("Name") if isinstance(node, dict) else None
            if isinstance(label, str) and label.strip():
                name = label.strip()
        return f"{path} (rule {name!r})" if name else path

    problems = []
    for error in exc.errors():
        if error["type"] == "unknown_keys":
            ctx = error.get("ctx", {})
            keys = ", ".join(where((*error["loc"], key)) for key in ctx["unknown"])
            problems.append(f"unknown key(s) {keys}; valid keys: {ctx['valid']}")
        else:
            problems.append(f"{where(error['loc'])} {explain(error)}")
    return "; ".join(problems)


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _regex(value: Any) -> re.Pattern[str] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PydanticCustomError("invalid", "must be a regular expression string")
    try:
        return re.compile(value, re.I)
    except re.error as exc:
        raise PydanticCustomError("invalid", "is not a valid regular expression: {error}",
                                  {"error": str(exc)}) from None


# One string or a list of them; compared upper-case.
_Words = Annotated[tuple[Upper, ...], BeforeValidator(_listed),
                   says("must be a string or a list of non-empty strings")]
_Regex = Annotated[re.Pattern[str] | None, PlainValidator(_regex)]
_AgeRange = Annotated[tuple[StrictFloat, StrictFloat] | None,
                      says("must be [min, max) in years", lambda a: a is None or 0 <= a[0] < a[1])]


class RuleSchema(Section):
    """A rule as ``AI.Routing.Rules`` writes it; ``rule()`` makes the Rule."""

    name: Text
    model: Text
    priority: StrictInt = 0
    action: Literal["run", "skip"] = "run"
    modality: _Words = ()
    sop_class_uid: _Words = Field((), alias="SOPClassUID")
    body_part: _Words = Field((), alias="BodyPartExamined")
    view_position: _Words = ()
    image_type_all: _Words = Field((), alias="ImageType")
    image_type_none: _Words = Field((), alias="ImageTypeExcludes")
    series_description: _Regex = None
    study_description: _Regex = None
    age_years: _AgeRange = None

    def rule(self) -> Rule:
        return Rule(**dict(self))


# A field of this type validates the JSON and holds the Rule.
ParsedRule = Annotated[RuleSchema, AfterValidator(RuleSchema.rule)]


@dataclass(frozen=True)
class Rule:
    name: str
    model: str
    priority: int = 0
    action: str = "run"  # or "skip"
    modality: tuple[str, ...] = ()
    sop_class_uid: tuple[str, ...] = ()  # exact, or a prefix ending in '*'
    body_part: tuple[str, ...] = ()
    view_position: tuple[str, ...] = ()
    image_type_all: tuple[str, ...] = ()
    image_type_none: tuple[str, ...] = ()
    series_description: re.Pattern[str] | None = None
    study_description: re.Pattern[str] | None = None
    age_years: tuple[float, float] | None = None  # [min, max)

    @classmethod
    def from_json(cls, data: Any, index: int) -> Rule:
        try:
            return RuleSchema.model_validate(data, context=FROM_JSON).rule()
        except ValidationError as exc:
            raise RoutingError(describe(exc, f"AI.Routing.Rules[{index}]", data)) from exc

    def matches(self, ds: Dataset, age: float | None) -> bool:
        def text(keyword: str) -> str:
            return str(ds.get(keyword, "") or "").strip().upper()

        if self.modality and text("Modality") not in self.modality:
            return False
        if self.sop_class_uid:
            sop = text("SOPClassUID")
            if not any(sop.startswith(p[:-1]) if p.endswith("*") else sop == p
                       for p in self.sop_class_uid):
                return False
        if self.body_part and text("BodyPartExamined") not in self.body_part:
            return False
        if self.view_position and text("ViewPosition") not in self.view_position:
            return False
        image_type = {v.strip().upper() for v in _values(ds.get("ImageType"))}
        if not set(self.image_type_all) <= image_type:
            return False
        if image_type & set(self.image_type_none):
            return False
        for pattern, keyword in ((self.series_description, "SeriesDescription"),
                                 (self.study_description, "StudyDescription")):
            if pattern is not None and not pattern.search(str(ds.get(keyword, "") or "")):
                return False
        if self.age_years is not None:
            if age is None or not self.age_years[0] <= age < self.age_years[1]:
                return False
        return True


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split("\\")
    return [str(v) for v in value]


def default_exclusion(ds: Dataset) -> str | None:
    """Why an image should not be analysed at all, or None."""
    image_type = [v.strip().upper() for v in _values(ds.get("ImageType"))]
    if "LOCALIZER" in image_type:
        return "localizer (ImageType LOCALIZER)"
    sop = str(ds.get("SOPClassUID", ""))
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary capture"
    # DERIVED\SECONDARY (reformats, renderings, screen captures) is excluded;
    # DERIVED\PRIMARY is kept: many DX "for presentation" images are processed
    # originals flagged that way.
    if image_type[:1] == ["DERIVED"] and (image_type[1:2] != ["PRIMARY"]
                                          or set(image_type[2:]) & _RECONSTRUCTED):
        shown = "\\".join(image_type)
        return f"derived image (ImageType {shown})"
    for keyword in ("SeriesDescription", "ProtocolName"):
        value = str(ds.get(keyword, "") or "")
        match = _LOCALIZER_WORDS.search(value)
        if match:  # the matched word only: descriptions are free text
            return f"localizer or dose page ({keyword} says {match.group(0)!r})"
    return None


def default_rules(cards: Iterable[ModelCard]) -> list[Rule]:
    """Without configured rules, each model gets what its card accepts."""
    return [
        Rule(name=f"{card.id} (card default)", model=card.id, modality=card.accepts.modalities,
             body_part=card.accepts.body_parts if card.accepts.body_parts else ())
        for card in cards
    ]


class Router:
    def __init__(self, rules: list[Rule], cards: Mapping[str, ModelCard],
                 exclude_by_default: bool = True) -> None:
        for rule in rules:
            card = cards.get(rule.model)
            if card is None:
                raise RoutingError(
                    f"AI.Routing rule {rule.name!r}: model {rule.model!r} is not installed "
                    f"(installed: {sorted(cards)})"
                )
            if rule.action == "run":
                if not rule.modality:
                    raise RoutingError(
                        f"AI.Routing rule {rule.name!r} must limit Modality to what model "
                        f"{card.id} accepts: {list(card.accepts.modalities)}"
                    )
                extra = sorted(set(rule.modality) - set(card.accepts.modalities))
                if extra:
                    raise RoutingError(
                        f"AI.Routing rule {rule.name!r} would send Modality {extra} to model "
                        f"{card.id}, whose card accepts only {list(card.accepts.modalities)}"
                    )
                parts = set(card.accepts.body_parts)
                if parts and (not rule.body_part or not set(rule.body_part) <= parts):
                    raise RoutingError(
                        f"AI.Routing rule {rule.name!r} must limit BodyPartExamined to what "
                        f"model {card.id} accepts: {sorted(parts)}"
                    )
        self.rules = sorted(rules, key=lambda r: -r.priority)
        self.cards = cards
        self.exclude_by_default = exclude_by_default

    def wants(self, modality: str, level: str) -> bool:
        """Could any run rule send an image of this modality to a model of this level?

        Lets the plugin decide from Orthanc's index, before downloading a file.
        """
        modality = modality.strip().upper()
        return any(
            rule.action == "run"
            and rule.model in self.cards
            and self.cards[rule.model].accepts.level == level
            and modality in rule.modality
            for rule in self.rules
        )

    def route(self, ds: Dataset, level: str = "instance") -> list[ModelCard]:
        """Models to run on this image; SkipInput with the reason when none."""
        if self.exclude_by_default:
            reason = default_exclusion(ds)
            if reason:
                raise SkipInput(f"excluded by default: {reason}")
        age, _ = patient_age(ds)
        decided: dict[str, Rule] = {}
        for rule in self.rules:  # highest priority first
            if rule.model in decided or rule.model not in self.cards:
                continue
            if self.cards[rule.model].accepts.level != level:
                continue
            if rule.matches(ds, age):
                decided[rule.model] = rule
        run = [self.cards[m] for m, r in decided.items() if r.action == "run"]
        if not run:
            skips = [r.name for r in decided.values()]
            if skips:
                raise SkipInput(f"skipped by rule(s): {', '.join(skips)}")
            raise SkipInput("no rule matched")
        # A greyscale image in a representation the card does not take (colour
        # ones are refused with their own reason when the pixels are read).
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            refused = [c for c in run if photometric not in c.accepts.photometric]
            run = [c for c in run if c not in refused]
            if not run:
                raise SkipInput(f"{photometric} not accepted by model(s) "
                                f"{', '.join(c.id for c in refused)}")
        return run
