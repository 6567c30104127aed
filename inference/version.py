"""The product's version: the one place it is written.

``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), and so do
``orthanc-ai --version``, each SR's Software Versions, ``GET /ai/models`` and
the audit trail's Application Activity messages. Nothing else spells it out.
"""

__version__ = "0.2.0"
