"""Outcomes of a job that are not a success.

A job ends in one of three visible ways besides ``done``; these exceptions
carry the reason a radiology IT engineer reads at ``GET /ai/jobs``.
"""


class JobOutcome(Exception):
    """Base class: ``reason`` is a short sentence without patient data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SkipInput(JobOutcome):
    """The input is valid but not for us (non-image, no rule matched, colour, ...)."""


class BadInput(JobOutcome):
    """The input is broken or unusable; retrying cannot help (job ``failed``)."""


class TransientError(JobOutcome):
    """Something outside the input failed (network, Orthanc busy); worth a retry."""
