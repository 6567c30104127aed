import pytest
from pydicom.dataset import Dataset

from inference.features import extract_metadata, feature_vector, parse_age_string, patient_age


@pytest.mark.parametrize(
    ("value", "years"),
    [("045Y", 45), ("006M", 0.5), ("026W", 26 * 7 / 365.25), ("010D", 10 / 365.25),
     ("45Y", 45), ("", None), ("45", None), ("ABCY", None), (None, None)],
)
def test_age_strings(value, years):
    got = parse_age_string(value)
    assert got == pytest.approx(years) if years is not None else got is None


def _ds(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_age_from_birth_date_when_patient_age_missing():
    age, source = patient_age(_ds(PatientBirthDate="19800301", StudyDate="20200229"))
    assert age == pytest.approx(39.99, abs=0.01)
    assert source == "PatientBirthDate/StudyDate"


def test_patient_age_wins_and_absurd_values_are_missing():
    assert patient_age(_ds(PatientAge="030Y", PatientBirthDate="19000101",
                           StudyDate="20200101"))[1] == "PatientAge"
    assert patient_age(_ds(PatientAge="999Y"))[0] is None
    assert patient_age(_ds(PatientBirthDate="20300101", StudyDate="20200101"))[0] is None


def test_spacing_precedence_and_magnification():
    m = extract_metadata(_ds(ImagerPixelSpacing=[0.2, 0.2],
                             EstimatedRadiographicMagnificationFactor=1.25))
    assert m.pixel_spacing_mm == pytest.approx((0.16, 0.16))
    m = extract_metadata(_ds(PixelSpacing=[0.1, 0.12], ImagerPixelSpacing=[0.2, 0.2]))
    assert m.pixel_spacing_mm == (0.1, 0.12) and m.spacing_source == "PixelSpacing"


def test_missing_metadata_is_explicit():
    m = extract_metadata(_ds(Modality="DX", PatientSex="O"))
    assert m.missing == ("age", "sex", "pixel_spacing", "slice_thickness")
    names = ("age_years", "age_known", "sex_male", "sex_female")
    assert feature_vector(m, names) == [0.0, 0.0, 0.0, 0.0]
    m = extract_metadata(_ds(Modality="DX", PatientSex="F", PatientAge="070Y"))
    assert feature_vector(m, names) == [pytest.approx(0.7), 1.0, 0.0, 1.0]
