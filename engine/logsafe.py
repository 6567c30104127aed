"""Tracebacks in our logs without exception messages that may quote DICOM values.

pydicom, highdicom, the image codecs and Python's own conversions put the
offending value in their messages (``Invalid value for VR DA: '19310317'``,
``invalid literal for int() with base 10: 'DOE^JANE'``). A traceback in a
worker's or the plugin's log keeps its frames (file, line, code: ours or the
library's) and the exception's type; the message of such an exception is
replaced by :data:`WITHHELD`. Messages of our own exceptions (their reasons
are our words) and of other libraries (network, job store) are kept.
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType

WITHHELD = "<message withheld: may hold patient data>"

# Packages whose messages may quote a value read from a DICOM file.
_DICOM_PACKAGES = ("pydicom", "highdicom", "PIL", "numpy", "pylibjpeg", "openjpeg",
                   "libjpeg", "jpeg_ls", "pylibjpeg_rle", "rle", "gdcm", "pynetdicom")
_OURS = ("engine", "inference", "plugin", "training", "orthanc_ai")  # modules, loggers


def _package(module: str) -> str:
    return module.split(".", 1)[0]


def _in_dicom_package(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return any(p in _DICOM_PACKAGES for p in parts[:-1])


def withheld(exc: BaseException) -> bool:
    """Whether the message of ``exc`` may quote a value from a DICOM file."""
    module = _package(type(exc).__module__)
    if module in _OURS:
        return False  # JobOutcome and the like: our words
    if module in _DICOM_PACKAGES or isinstance(exc, ValueError):
        return True  # ValueError: int('DOE^JANE') and the like, wherever raised
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        if _in_dicom_package(tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    return False


def _withheld_message(record: logging.LogRecord) -> bool:
    """pydicom and highdicom log messages that quote values (``log.exception(exc)``
    logs the exception's text); so may any library's record of such an exception."""
    if _package(record.name) in _DICOM_PACKAGES and record.name.split(".")[0] != "pynetdicom":
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and _package(record.name) not in _OURS and withheld(exc)


def _lines(exc: BaseException, seen: set[int]) -> list[str]:
    seen.add(id(exc))
    out: list[str] = []
    if exc.__cause__ is not None and id(exc.__cause__) not in seen:
        out += _lines(exc.__cause__, seen)
        out.append("\nThe above exception was the direct cause of the following "
                   "exception:\n\n")
    elif (exc.__context__ is not None and not exc.__suppress_context__
          and id(exc.__context__) not in seen):
        out += _lines(exc.__context__, seen)
        out.append("\nDuring handling of the above exception, another exception "
                   "occurred:\n\n")
    if exc.__traceback__ is not None:
        out.append("Traceback (most recent call last):\n")
        out += traceback.format_tb(exc.__traceback__)
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") \
        else f"{kind.__module__}.{kind.__qualname__}"
    if withheld(exc):
        out.append(f"{name}: {WITHHELD}\n")
    else:
        out += traceback.format_exception_only(kind, exc)
    return out


class SafeFormatter(logging.Formatter):
    """A Formatter whose tracebacks withhold messages that may hold patient data."""

    def format(self, record: logging.LogRecord) -> str:
        # Another handler may have cached its own rendering of the traceback.
        cached, record.exc_text = record.exc_text, None
        msg, args = record.msg, record.args
        if _withheld_message(record):
            record.msg, record.args = f"{record.name}: {WITHHELD}", None
        try:
            return super().format(record)
        finally:
            record.exc_text, record.msg, record.args = cached, msg, args

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        exc = ei[1]
        if exc is None:
            return super().formatException(ei)
        return "".join(_lines(exc, set())).rstrip("\n")


def make_safe(handler: logging.Handler) -> None:
    """Give ``handler`` a :class:`SafeFormatter` with its current format."""
    current = handler.formatter
    fmt = current._fmt if current is not None else None  # noqa: SLF001
    datefmt = current.datefmt if current is not None else None
    handler.setFormatter(SafeFormatter(fmt, datefmt))
