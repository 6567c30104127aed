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
Manufacturer: an SR we stored over REST has origin ``REST_API`` like any
upload), the default exclusions, then the rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydicom loads every codec (GDCM too): not in Orthanc's process
    from pydicom.dataset import Dataset

from .card import ModelCard
from .errors import SkipInput
from .features import patient_age

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
OWN_MANUFACTURER = "orthanc-ai"  # Manufacturer of every SR we write
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

# SOP Class UID prefixes of objects without an image to analyse; they are
# skipped from Orthanc's metadata alone, without downloading the file.
_NON_IMAGE_PREFIXES = (
    SR_PREFIX,  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
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
    """Only SRs can be ours; whether it is, its Manufacturer says."""
    return sop_class_uid.startswith(SR_PREFIX)


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


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RoutingError(f"{where} must be a string or a list of non-empty strings")
    return tuple(v.strip().upper() for v in value)


def _regex(value: Any, where: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise RoutingError(f"{where} must be a regular expression string")
    try:
        return re.compile(value, re.I)
    except re.error as exc:
        raise RoutingError(f"{where} is not a valid regular expression: {exc}") from exc


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

    _KEYS = {
        "Name", "Model", "Priority", "Action", "Modality", "SOPClassUID", "BodyPartExamined",
        "ViewPosition", "ImageType", "ImageTypeExcludes", "SeriesDescription",
        "StudyDescription", "AgeYears",
    }

    @classmethod
    def from_json(cls, data: Any, index: int) -> Rule:
        where = f"AI.Routing.Rules[{index}]"
        if not isinstance(data, dict):
            raise RoutingError(f"{where} must be an object")
        unknown = sorted(set(data) - cls._KEYS)
        if unknown:
            raise RoutingError(f"{where}: unknown key(s) {unknown}; valid: {sorted(cls._KEYS)}")
        for key in ("Name", "Model"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise RoutingError(f"{where}.{key} is required (a non-empty string)")
        where = f"AI.Routing rule {data['Name']!r}"
        priority = data.get("Priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RoutingError(f"{where}.Priority must be an integer")
        action = data.get("Action", "run")
        if action not in ("run", "skip"):
            raise RoutingError(f"{where}.Action must be 'run' or 'skip'")
        age = data.get("AgeYears")
        if age is not None:
            ok = (isinstance(age, list) and len(age) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in age)
                  and 0 <= age[0] < age[1])
            if not ok:
                raise RoutingError(f"{where}.AgeYears must be [min, max) in years")
            age = (float(age[0]), float(age[1]))

        def opt(key: str) -> tuple[str, ...]:
            return _strings(data[key], f"{where}.{key}") if key in data else ()

        return cls(
            name=data["Name"].strip(),
            model=data["Model"].strip(),
            priority=priority,
            action=action,
            modality=opt("Modality"),
            sop_class_uid=opt("SOPClassUID"),
            body_part=opt("BodyPartExamined"),
            view_position=opt("ViewPosition"),
            image_type_all=opt("ImageType"),
            image_type_none=opt("ImageTypeExcludes"),
            series_description=(_regex(data["SeriesDescription"], f"{where}.SeriesDescription")
                                if "SeriesDescription" in data else None),
            study_description=(_regex(data["StudyDescription"], f"{where}.StudyDescription")
                               if "StudyDescription" in data else None),
            age_years=age,
        )

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
