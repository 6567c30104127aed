"""Tracebacks in our logs withhold exception messages that may quote DICOM values."""

import io
import logging

import pydicom
import pytest

from engine.logsafe import WITHHELD, SafeFormatter, make_safe
from inference.errors import BadInput

# Built at run time: a traceback quotes source lines, and these must not be one.
NAME, PATIENT_ID = "ZQXWI" + "DOW^JOSEPHINE 1931" + "0317", "ZQX-" + "9431-ID"


def _logged(raise_it) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    make_safe(handler)
    log = logging.getLogger("orthanc_ai.test_logsafe")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise_it()
        except Exception:
            log.exception("orthanc-ai: job %d failed", 7)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_a_pydicom_message_is_withheld_its_type_and_frames_kept():
    def bad_date():
        pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
        try:
            pydicom.valuerep.DA(NAME)
        finally:
            pydicom.config.settings.reading_validation_mode = pydicom.config.WARN

    text = _logged(bad_date)
    assert "ERROR orthanc-ai: job 7 failed" in text
    assert "ZQXWIDOW" not in text and "19310317" not in text
    assert f"ValueError: {WITHHELD}" in text
    assert "valuerep" in text and "bad_date" in text  # the frames stay


def test_a_builtin_conversion_in_our_code_is_withheld_and_chains_are_followed():
    def ours():
        try:
            int(PATIENT_ID)
        except ValueError as exc:
            raise RuntimeError("wrapped") from exc

    text = _logged(ours)
    assert "ZQX-9431-ID" not in text
    assert f"ValueError: {WITHHELD}" in text
    assert "direct cause" in text and "RuntimeError: wrapped" in text


def test_our_own_reasons_and_other_messages_are_kept():
    def job():
        raise BadInput("pixel data truncated: 10 bytes for 20 expected")

    assert "pixel data truncated: 10 bytes" in _logged(job)
    assert "connection refused" in _logged(lambda: (_ for _ in ()).throw(
        ConnectionError("connection refused")))


@pytest.mark.parametrize("fmt", [None, "%(message)s"])
def test_the_formatter_keeps_the_format(fmt):
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(fmt))
    make_safe(handler)
    assert isinstance(handler.formatter, SafeFormatter)
    assert handler.formatter._fmt == logging.Formatter(fmt)._fmt


def test_a_pydicom_log_record_quoting_its_exception_is_withheld():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    make_safe(handler)
    log = logging.getLogger("pydicom.pixels.test_logsafe")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            int(PATIENT_ID)
        except ValueError as exc:
            log.exception(exc)  # what pydicom's pixel decoders do
        log.error("value %s", NAME)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert PATIENT_ID not in text and NAME not in text
    assert f"pydicom.pixels.test_logsafe: {WITHHELD}" in text
    assert "Traceback" in text
