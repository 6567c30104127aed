"""Pure-Python inference core of orthanc-ai: no `orthanc` import here.

Preprocessing (pydicom -> arrays + metadata features), model cards and
registry, back ends, post-processing and the DICOM SR report.
"""
