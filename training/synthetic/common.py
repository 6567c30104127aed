"""What every synthetic instance shares: file meta, SOP Common, Patient and Study modules."""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian


def age_string(years: float) -> str:
    """PS3.5 AS value: days, weeks, months or years, 3 digits and a unit."""
    if years >= 2.0:
        return f"{min(int(years), 999):03d}Y"
    if years >= 2.0 / 12.0:
        return f"{int(years * 12):03d}M"
    return f"{int(years * 365.25 / 7):03d}W"


def base_dataset(
    sop_class_uid: str,
    sop_uid: str,
    *,
    instance_number: int,
    patient_id: str,
    patient_name: str,
    patient_sex: str | None,
    patient_age_years: float | None,
    birth_date: str | None,
    study_uid: str,
    study_date: str,
    study_time: str,
    accession_number: str,
    study_description: str,
) -> Dataset:
    """File meta (Explicit VR Little Endian), SOP Common, Patient, General/Patient Study.

    PatientSex and PatientBirthDate are Type 2 (present, empty when unknown);
    PatientAge is Type 3 and left out when unknown.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ORTHANC_AI_SYN"

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = study_time
    ds.InstanceNumber = instance_number

    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date or ""
    ds.PatientSex = patient_sex or ""
    ds.PatientIdentityRemoved = "NO"

    # General Study / Patient Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = accession_number[-16:] if accession_number else "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description
    if patient_age_years is not None:
        ds.PatientAge = age_string(patient_age_years)
    return ds
