"""Model cards and drop-in model folders are validated at load with clear errors."""

import pytest

from inference.backend import Batch, InProcessBackend
from inference.card import CardError, ModelCard
from inference.registry import Registry
from tests.factories import card_json, tiny_keras_model, write_card


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_keras_model(folder)
    write_card(folder, card_json())
    return folder


def test_valid_folder_loads_and_predicts(good_folder):
    card = ModelCard.from_folder(good_folder)
    backend = InProcessBackend()
    backend.load(card)
    import numpy as np

    out = backend.predict(card, Batch(np.zeros((2, 32, 32, 1), np.float32),
                                      np.zeros((2, 2), np.float32)))
    assert len(out) == 2 and 0.0 <= out[0].probability <= 1.0
    assert out[0].heatmap.shape == (8, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 2}, "'schema' must be 1"),
        ({"format": "onnx"}, "'format'"),
        ({"weights": "missing.keras"}, "'weights' file 'missing.keras' not found"),
        ({"threshold": 1.5}, "'threshold'"),
        ({"id": "bad id!"}, "'id'"),
        ({"accepts": {"level": "study", "modalities": ["DX"]}}, "'level'"),
        ({"finding": {"value": "1", "scheme": "SCT"}}, "missing key 'meaning'"),
        ({"schema": True}, "'schema' must be 1"),  # strict: true is not 1
        ({"threshold": "high"}, "'threshold' must be a number"),
        ({"name": "  "}, "'name' must not be empty"),
        ({"accepts": {"level": "instance", "modalities": []}}, "accepts: 'modalities'"),
        ({"accepts": {"level": "instance", "modalities": ["DX", 3]}}, "'modalities\\[1\\]'"),
        ({"outputs": "probability"}, "'outputs' must be an object"),
        ({"accepts": {"level": "series", "modalities": ["CT"]},
          "outputs": {"probability": {"name": "probability"}}}, "needs a 'heatmap' output"),
    ],
)
def test_card_errors_name_the_key(tmp_path, good_folder, change, message):
    (tmp_path / "model.keras").write_bytes((good_folder / "model.keras").read_bytes())
    write_card(tmp_path, card_json(**change))
    with pytest.raises(CardError, match=message):
        ModelCard.from_folder(tmp_path)


def test_unknown_metadata_feature_is_refused(tmp_path, good_folder):
    (tmp_path / "model.keras").write_bytes((good_folder / "model.keras").read_bytes())
    card = card_json()
    card["inputs"]["metadata"]["features"] = ["age_years", "shoe_size"]
    write_card(tmp_path, card)
    with pytest.raises(CardError, match="shoe_size"):
        ModelCard.from_folder(tmp_path)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ({"shape": [32, 32]}, "inputs:image: 'shape' must be \\[rows, columns, channels\\]"),
        ({"shape": [32, 0, 1]}, "'shape' must be"),
        ({"pixel_spacing_mm": 0.001}, "'pixel_spacing_mm'"),
        ({"windows": [[40, 80], [80, 200]]}, "'windows' must list one"),  # one channel
        ({"windows": [[40, -1]]}, "'windows' must list one"),
    ],
)
def test_image_input_errors_name_the_key(tmp_path, good_folder, image, message):
    (tmp_path / "model.keras").write_bytes((good_folder / "model.keras").read_bytes())
    card = card_json()
    card["inputs"]["image"].update(image)
    write_card(tmp_path, card)
    with pytest.raises(CardError, match=message):
        ModelCard.from_folder(tmp_path)


def test_card_values_are_normalised(tmp_path, good_folder):
    (tmp_path / "model.keras").write_bytes((good_folder / "model.keras").read_bytes())
    card = card_json(accepts={"level": "instance", "modalities": ["dx"], "body_parts": ["leg"]})
    card["inputs"]["image"]["windows"] = [[40, 80]]
    write_card(tmp_path, card)
    loaded = ModelCard.from_folder(tmp_path)
    assert loaded.accepts.modalities == ("DX",) and loaded.accepts.body_parts == ("LEG",)
    assert loaded.accepts.photometric == ("MONOCHROME1", "MONOCHROME2")
    assert loaded.image.shape == (32, 32, 1) and loaded.image.windows == ((40.0, 80.0),)
    assert loaded.metadata.features == ("age_years", "age_known")
    assert (loaded.heatmap_output, loaded.heatmap_stride) == ("heatmap", 4)
    assert loaded.weights == tmp_path / "model.keras" and loaded.finding.meaning == "Fracture"


def test_weights_that_do_not_match_the_card_are_refused(tmp_path):
    tiny_keras_model(tmp_path, image_shape=(64, 64, 1))
    write_card(tmp_path, card_json())
    with pytest.raises(CardError, match="does not accept the inputs the card declares"):
        InProcessBackend().load(ModelCard.from_folder(tmp_path))


def test_missing_output_is_refused(tmp_path):
    tiny_keras_model(tmp_path, output_names=("score", "heatmap"))
    write_card(tmp_path, card_json())
    with pytest.raises(CardError, match="'probability' not among"):
        InProcessBackend().load(ModelCard.from_folder(tmp_path))


def test_corrupt_weights_are_refused(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a keras file")
    write_card(tmp_path, card_json())
    with pytest.raises(CardError, match="cannot be loaded"):
        InProcessBackend().load(ModelCard.from_folder(tmp_path))


def test_registry_lists_bad_folders_and_keeps_good_ones(tmp_path, good_folder):
    (tmp_path / "good").mkdir()
    for f in good_folder.iterdir():
        (tmp_path / "good" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{ not json")
    reg = Registry.scan(tmp_path)
    assert list(reg.cards) == ["tiny-xr"]
    assert "not valid JSON" in reg.errors["broken"]
