"""Routing rules: declarative, prioritised, refused at start-up when unsafe."""

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from engine.config import ConfigError, parse_ai_section
from inference.card import ModelCard
from inference.errors import SkipInput
from inference.routing import Router, RoutingError, Rule, default_exclusion, default_rules
from tests.factories import card_json, write_card


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    out = {}
    for model_id, modalities, parts, photometric in (
            ("xr", ["DX", "CR"], ["FOREARM", "LEG"], ["MONOCHROME1", "MONOCHROME2"]),
            ("ct", ["CT"], [], ["MONOCHROME2"])):
        folder: Path = tmp_path_factory.mktemp(model_id)
        (folder / "model.keras").write_bytes(b"")
        write_card(folder, card_json(id=model_id, accepts={
            "level": "instance", "modalities": modalities, "body_parts": parts,
            "photometric": photometric}))
        out[model_id] = ModelCard.from_folder(folder)
    return out


def image(**kw) -> Dataset:
    ds = Dataset()
    ds.Modality = "DX"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "FOREARM"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def rules(*specs):
    return [Rule.from_json(s, i) for i, s in enumerate(specs)]


def test_card_defaults_route_by_modality_and_body_part(cards):
    router = Router(default_rules(cards.values()), cards)
    assert [c.id for c in router.route(image())] == ["xr"]
    assert [c.id for c in router.route(image(Modality="CT", BodyPartExamined="HEAD"))] == ["ct"]
    with pytest.raises(SkipInput, match="no rule matched"):
        router.route(image(BodyPartExamined="CHEST"))
    with pytest.raises(SkipInput, match="no rule matched"):
        router.route(image(Modality="MR"))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ImageType": ["DERIVED", "SECONDARY"]}, "derived image"),
        ({"ImageType": ["DERIVED", "PRIMARY", "MPR"]}, "derived image"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary capture"),
        ({"SeriesDescription": "Dose Report"}, "dose"),
        ({"SeriesDescription": "Topogram 0.6 T20f"}, "localizer"),
    ],
)
def test_default_exclusions(cards, changes, reason):
    router = Router(default_rules(cards.values()), cards)
    with pytest.raises(SkipInput, match=f"excluded by default: .*{reason}"):
        router.route(image(**changes))
    assert Router(default_rules(cards.values()), cards, exclude_by_default=False).route(
        image(**changes) if "SOPClassUID" not in changes else image()
    )


def test_priority_and_skip_rules(cards):
    router = Router(rules(
        {"Name": "adult limbs", "Model": "xr", "Modality": ["DX"],
         "BodyPartExamined": ["FOREARM", "LEG"], "Priority": 1},
        {"Name": "no children", "Model": "xr", "Action": "skip", "AgeYears": [0, 18],
         "Priority": 10},
    ), cards)
    assert router.route(image(PatientAge="040Y"))
    with pytest.raises(SkipInput, match="skipped by rule.*no children"):
        router.route(image(PatientAge="009Y"))
    assert router.route(image())  # age unknown: the age rule does not match


def test_matching_on_descriptions_view_and_image_type(cards):
    router = Router(rules({
        "Name": "AP forearm", "Model": "xr", "Modality": "DX", "BodyPartExamined": "FOREARM",
        "ViewPosition": ["AP", "PA"], "ImageType": ["ORIGINAL"],
        "ImageTypeExcludes": ["STITCHED"], "SeriesDescription": "^arm|forearm",
        "StudyDescription": "trauma",
    }), cards)
    good = image(ViewPosition="AP", SeriesDescription="Forearm AP", StudyDescription="XR trauma")
    assert router.route(good)
    for bad in (dict(ViewPosition="LL"), dict(SeriesDescription="hand"),
                dict(StudyDescription="routine"), dict(ImageType=["ORIGINAL", "STITCHED"])):
        ds = image(ViewPosition="AP", SeriesDescription="Forearm AP",
                   StudyDescription="XR trauma")
        for k, v in bad.items():
            setattr(ds, k, v)
        with pytest.raises(SkipInput):
            router.route(ds)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"Name": "r", "Model": "xr", "Modality": ["DX", "CT"], "BodyPartExamined": "LEG"},
         r"would send Modality \['CT'\]"),
        ({"Name": "r", "Model": "xr", "BodyPartExamined": "LEG"}, "must limit Modality"),
        ({"Name": "r", "Model": "xr", "Modality": "DX"}, "must limit BodyPartExamined"),
        ({"Name": "r", "Model": "xr", "Modality": "DX", "BodyPartExamined": "CHEST"},
         "must limit BodyPartExamined"),
        ({"Name": "r", "Model": "nope", "Modality": "DX"}, "not installed"),
    ],
)
def test_unsafe_rules_are_refused_at_start_up(cards, spec, message):
    with pytest.raises(RoutingError, match=message):
        Router(rules(spec), cards)


def test_routing_section_errors_name_the_key():
    with pytest.raises(ConfigError,
                       match=r"unknown key\(s\) AI\.Routing\.Rules\[0\]\.Modalty .*valid keys"):
        parse_ai_section({"Routing": {"Rules": [{"Name": "a", "Model": "m", "Modalty": "DX"}]}})
    with pytest.raises(ConfigError, match="AgeYears"):
        parse_ai_section({"Routing": {"Rules": [{"Name": "a", "Model": "m", "AgeYears": [5]}]}})
    with pytest.raises(ConfigError, match="SeriesDescription"):
        parse_ai_section({"Routing": {"Rules": [
            {"Name": "a", "Model": "m", "SeriesDescription": "("}]}})
    with pytest.raises(ConfigError, match="AI.Routing"):
        parse_ai_section({"Routing": {"Rulez": []}})
    with pytest.raises(ConfigError, match=r"AI\.Routing\.Rules\[2\]\.Modality \(rule 'c'\)"):
        parse_ai_section({"Routing": {"Rules": [
            {"Name": "a", "Model": "m", "Modality": "DX"}, {"Name": "b", "Model": "m"},
            {"Name": "c", "Model": "m", "Modality": ["DX", 3]}]}})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("not an object", r"Rules\[1\] must be an object"),
        ({"Model": "m"}, r"Rules\[1\]\.Name is required"),
        ({"Name": " ", "Model": "m"}, r"Rules\[1\]\.Name must not be empty"),
        ({"Name": "a", "Model": "m", "Priority": True}, r"Rules\[1\]\.Priority .*integer"),
        ({"Name": "a", "Model": "m", "Action": "maybe"}, r"Action .*'run' or 'skip'"),
        ({"Name": "a", "Model": "m", "AgeYears": [18, 5]}, r"AgeYears .*\[min, max\)"),
        ({"Name": "a", "Model": "m", "AgeYears": [0, True]}, r"AgeYears .*\[min, max\)"),
        ({"Name": "a", "Model": "m", "StudyDescription": 3}, "StudyDescription .*regular"),
        ({"Name": "a", "Model": "m", "Modality": ["DX", ""]}, "Modality .*non-empty strings"),
    ],
)
def test_rule_errors_name_the_rule_and_key(spec, message):
    with pytest.raises(RoutingError, match=message):
        Rule.from_json(spec, 1)


def test_rule_values_are_normalised():
    rule = Rule.from_json({"Name": " a ", "Model": "m", "Modality": "dx ", "AgeYears": [0, 18],
                           "SeriesDescription": "^ARM"}, 0)
    assert (rule.name, rule.modality, rule.age_years) == ("a", ("DX",), (0.0, 18.0))
    assert rule.series_description.search("arm AP")


def test_default_exclusion_keeps_ordinary_images():
    assert default_exclusion(image()) is None
    assert default_exclusion(image(ImageType=["DERIVED", "PRIMARY"])) is None  # processed DX


def test_low_dose_series_are_not_mistaken_for_dose_reports(cards):
    router = Router(default_rules(cards.values()), cards)
    assert [c.id for c in router.route(image(SeriesDescription="Low dose, 2.5 mm"))] == ["xr"]


def test_a_greyscale_representation_the_card_refuses_is_skipped(cards):
    router = Router(default_rules(cards.values()), cards)
    assert router.route(image(PhotometricInterpretation="MONOCHROME1"))  # xr takes both
    with pytest.raises(SkipInput, match="MONOCHROME1 not accepted by model.*ct"):
        router.route(image(Modality="CT", BodyPartExamined="HEAD",
                           PhotometricInterpretation="MONOCHROME1"))
