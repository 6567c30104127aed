"""The ``AI`` section of orthanc.json, parsed once at start-up into a frozen pydantic model.

Unknown keys and wrong types fail loudly, naming the key, so that a typo
in a hospital's configuration does not silently switch a feature off.
Types are strict: ``true`` is not 1, ``"2"`` is not 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from engine.stores import is_postgres_url
from inference.card import ModelCard, says
from inference.routing import (
    FROM_JSON,
    ParsedRule,
    Router,
    Rule,
    Section,
    default_rules,
    describe,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """The AI configuration is wrong; the message names the key."""


def _project_path(value: Any) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise PydanticCustomError("invalid", "must be a non-empty path string")
    return PROJECT_ROOT / value  # an absolute value stays as it is


_ProjectPath = Annotated[Path, PlainValidator(_project_path)]
_QueueDatabase = Annotated[StrictStr, says(
    "must be a SQLite file path or a postgresql:// URL",
    lambda v: "://" not in v or is_postgres_url(v))]
_HttpUrl = Annotated[StrictStr, says("must be an http:// or https:// URL",
                                     lambda v: not v or v.startswith(("http://", "https://")))]


class _Routing(Section):
    """``AI.Routing``; without Rules, each model gets what its card accepts."""

    exclude_by_default: StrictBool = True
    rules: tuple[ParsedRule, ...] | None = None


_PeerNames = tuple[Annotated[StrictStr, says("must be a non-empty DicomModalities name",
                                             lambda v: bool(v.strip()))], ...]


class _Priors(Section):
    """``AI.Priors``: prior studies of the same patient, for interval change."""

    sources: _PeerNames = ()  # PACS to query, by their DicomModalities name
    max_age_days: StrictInt = Field(3650, ge=1)
    max_priors: StrictInt = Field(1, ge=1, le=10)  # most recent relevant priors retrieved
    # The current result is never held back longer than this, from its study's first job.
    deadline_seconds: StrictFloat = Field(60.0, ge=1)
    same_body_part: StrictBool = True  # a prior of another body part is not relevant
    # "C-MOVE" (to our own AE) or "C-GET", per source; default C-MOVE
    retrieve_method: dict[StrictStr, Literal["C-MOVE", "C-GET"]] = Field(default_factory=dict)
    # Priors fetched only for comparison are deleted from Orthanc after this (0: kept).
    retention_hours: StrictFloat = Field(24.0, ge=0)
    # Later attempts (after the deadline) may take this long per PACS operation.
    retrieve_timeout_seconds: StrictFloat = Field(600.0, ge=1)
    max_attempts: StrictInt = Field(10, ge=1)
    retry_backoff_seconds: StrictFloat = Field(10.0, ge=0)
    max_backoff_seconds: StrictFloat = Field(600.0, ge=0)


class _Forward(Section):
    """``AI.Forward``: every SR we store is also sent to these DICOM destinations."""

    destinations: _PeerNames = ()
    max_attempts: StrictInt = Field(20, ge=1)
    retry_backoff_seconds: StrictFloat = Field(5.0, ge=0)
    max_backoff_seconds: StrictFloat = Field(600.0, ge=0)
    timeout_seconds: StrictFloat = Field(60.0, gt=0)  # one C-STORE association


class _HL7(Section):
    """``AI.HL7``: an ORU^R01 (v2.5.1) per stored SR to the RIS, over MLLP."""

    host: StrictStr = ""  # empty: no HL7
    port: StrictInt = Field(2575, ge=1, le=65535)
    sending_application: StrictStr = "ORTHANC-AI"
    sending_facility: StrictStr = ""
    receiving_application: StrictStr = ""
    receiving_facility: StrictStr = ""
    timeout_seconds: StrictFloat = Field(30.0, gt=0)  # connect + ACK
    max_attempts: StrictInt = Field(20, ge=1)
    retry_backoff_seconds: StrictFloat = Field(5.0, ge=0)
    max_backoff_seconds: StrictFloat = Field(600.0, ge=0)


class _Audit(Section):
    """``AI.Audit``: DICOM PS3.15 A.5 audit messages, to a hash-chained local log
    and, with a Host, to a syslog collector (RFC 5424 over TCP or TLS)."""

    host: StrictStr = ""  # empty: the local log only
    port: StrictInt = Field(6514, ge=1, le=65535)
    transport: Literal["tcp", "tls"] = "tcp"
    ca_file: StrictStr = ""  # TLS: the collector's CA (PEM)
    cert_file: StrictStr = ""  # TLS: our client certificate (PEM), if the collector asks
    key_file: StrictStr = ""
    timeout_seconds: StrictFloat = Field(10.0, gt=0)
    retry_backoff_seconds: StrictFloat = Field(5.0, ge=0)
    max_backoff_seconds: StrictFloat = Field(300.0, ge=0)


class AIConfig(Section):
    """The JSON key of each field is its CamelCase name (``Workers``), as Orthanc's keys are."""

    enabled: StrictBool = True
    models_directory: _ProjectPath = PROJECT_ROOT / "models"
    workers: StrictInt = Field(1, ge=1)
    # A SQLite path, or a postgresql:// URL shared by several Orthanc nodes;
    # default: <StorageDirectory>/orthanc-ai/jobs.sqlite
    queue_database: _QueueDatabase = ""
    node_name: StrictStr = ""  # default: <hostname>:<HttpPort>
    # A claimed job whose worker stops renewing is due again.
    lease_seconds: StrictFloat = Field(30.0, ge=2)
    # A batch (or series job) still running after this long means a hung
    # decoder or model: the worker exits, and the death counts as an attempt.
    job_timeout_seconds: StrictFloat = Field(900.0, ge=10)
    max_pixel_bytes: StrictInt = Field(1 << 30, ge=0)
    max_instance_bytes: StrictInt = Field(2 << 30, ge=0)
    tensorflow_threads: StrictInt = Field(0, ge=0, alias="TensorFlowThreads")  # 0: TF decides
    http_timeout_seconds: StrictFloat = Field(60.0, gt=0)
    max_attempts: StrictInt = Field(3, ge=1)
    retry_backoff_seconds: StrictFloat = Field(5.0, ge=0)
    batch_size: StrictInt = Field(8, gt=0)  # images (or slices of a volume) per model call
    batch_wait_ms: StrictFloat = Field(0.0, ge=0)  # how long to wait for more images
    # "http": a TF Serving / KServe V1 model server
    backend: Literal["in-process", "http"] = "in-process"
    model_server_url: _HttpUrl = ""  # http backend; empty: the plugin starts our own server
    changes_poll_seconds: StrictFloat = Field(1.0, gt=0)
    # How much the worker processes yield the CPU to Orthanc: a nice value, or
    # "idle" scheduling (SCHED_IDLE: they run on CPU time nobody else wants).
    worker_nice: StrictInt = Field(10, ge=0, le=19)
    worker_scheduling: Literal["normal", "idle"] = "normal"
    routing: _Routing = Field(default_factory=_Routing)
    priors: _Priors = Field(default_factory=_Priors)
    forward: _Forward = Field(default_factory=_Forward)
    # With each SR of a located finding, a GSPS drawing it and a KOS naming the
    # key image (inference.presentation), for viewers that do not render SR.
    presentation_states: StrictBool = True
    hl7: _HL7 = Field(default_factory=_HL7, alias="HL7")
    audit: _Audit = Field(default_factory=_Audit)
    # Users (Orthanc's RegisteredUsers) allowed the /ai routes that change
    # anything, when Orthanc's authentication is on.
    administrators: tuple[StrictStr, ...] = ()
    # The OHIF viewer served at /ohif/ (`make ohif` installs it there); an
    # empty value switches the viewer off.
    ohif_directory: StrictStr = str(PROJECT_ROOT / "build" / "ohif" / "dist")

    @property
    def routing_rules(self) -> tuple[Rule, ...] | None:
        """AI.Routing.Rules; None: each model's card decides."""
        return self.routing.rules

    @property
    def exclude_by_default(self) -> bool:
        return self.routing.exclude_by_default

    def queue_location(self, storage: Path) -> str | Path:
        """Where the job store lives: the configured URL or path, else beside Orthanc's files."""
        if not self.queue_database:
            return storage / "orthanc-ai" / "jobs.sqlite"
        if is_postgres_url(self.queue_database):
            return self.queue_database
        path = Path(self.queue_database)
        return path if path.is_absolute() else PROJECT_ROOT / path

    def router(self, cards: Mapping[str, ModelCard]) -> Router:
        """Rules checked against the installed model cards (RoutingError if wrong)."""
        rules = list(self.routing_rules) if self.routing_rules is not None else \
            default_rules(cards.values())
        return Router(rules, cards, self.exclude_by_default)


def parse_ai_section(section: Any) -> AIConfig:
    """Validate the ``AI`` object of the Orthanc configuration."""
    if section is None:
        return AIConfig()
    if not isinstance(section, dict):
        raise ConfigError("AI must be a JSON object")
    try:
        return AIConfig.model_validate(section, context=FROM_JSON)
    except ValidationError as exc:
        raise ConfigError(describe(exc, "AI", section)) from exc


def check_peers(ai: AIConfig, configuration: Mapping[str, Any]) -> None:
    """Every PACS named in AI.Priors and AI.Forward is one of Orthanc's DicomModalities
    (unless Orthanc keeps them in its database, where only Orthanc can tell)."""
    if configuration.get("DicomModalitiesInDatabase") is True:
        return
    modalities = configuration.get("DicomModalities") or {}
    known = set(modalities) if isinstance(modalities, dict) else set()
    named = [("AI.Priors.Sources", n) for n in ai.priors.sources] + \
        [("AI.Forward.Destinations", n) for n in ai.forward.destinations] + \
        [("AI.Priors.RetrieveMethod", n) for n in ai.priors.retrieve_method]
    for key, name in named:
        if name not in known:
            raise ConfigError(f"{key}: {name!r} is not in DicomModalities "
                              f"(known: {', '.join(sorted(known)) or 'none'})")


_COMMENT = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', re.S)


def load_orthanc_json(path: Path) -> dict[str, Any]:
    """Orthanc's configuration files allow // and /* */ comments; JSON does not."""
    text = path.read_text(encoding="utf-8")
    stripped = _COMMENT.sub(lambda m: m.group(1) or "", text)
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a JSON object")
    return data
