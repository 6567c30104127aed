"""The ``AI`` section of orthanc.json, parsed once at start-up into a frozen dataclass.

Unknown keys and wrong types fail loudly, naming the key, so that a typo
in a hospital's configuration does not silently switch a feature off.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from inference.card import ModelCard
from inference.routing import Router, RoutingError, Rule, default_rules

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """The AI configuration is wrong; the message names the key."""


@dataclass(frozen=True)
class AIConfig:
    enabled: bool = True
    models_directory: Path = PROJECT_ROOT / "models"
    workers: int = 1
    # A SQLite path, or a postgresql:// URL shared by several Orthanc nodes;
    # default: <StorageDirectory>/orthanc-ai/jobs.sqlite
    queue_database: str = ""
    node_name: str = ""  # default: <hostname>:<HttpPort>
    lease_seconds: float = 30.0  # a claimed job whose worker stops renewing is due again
    # A batch (or series job) still running after this long means a hung
    # decoder or model: the worker exits, and the death counts as an attempt.
    job_timeout_seconds: float = 900.0
    max_pixel_bytes: int = 1 << 30
    max_instance_bytes: int = 2 << 30
    tensorflow_threads: int = 0  # 0 lets TensorFlow decide
    http_timeout_seconds: float = 60.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 5.0
    batch_size: int = 8  # images (or slices of a volume) per model call
    batch_wait_ms: float = 0.0  # how long to wait for more images to fill a batch
    backend: str = "in-process"  # or "http": a TF Serving / KServe V1 model server
    model_server_url: str = ""  # http backend; empty: the plugin starts our own server
    changes_poll_seconds: float = 1.0
    worker_nice: int = 10  # 0-19: how much the worker processes yield the CPU to Orthanc
    # AI.Routing: {"ExcludeByDefault": bool, "Rules": [...]}; None = card defaults
    routing_rules: tuple[Rule, ...] | None = None
    exclude_by_default: bool = True

    def queue_location(self, storage: Path) -> str | Path:
        """Where the job store lives: the configured URL or path, else beside Orthanc's files."""
        if not self.queue_database:
            return storage / "orthanc-ai" / "jobs.sqlite"
        if self.queue_database.startswith(("postgresql://", "postgres://")):
            return self.queue_database
        path = Path(self.queue_database)
        return path if path.is_absolute() else PROJECT_ROOT / path

    def router(self, cards: Mapping[str, ModelCard]) -> Router:
        """Rules checked against the installed model cards (RoutingError if wrong)."""
        rules = list(self.routing_rules) if self.routing_rules is not None else \
            default_rules(cards.values())
        return Router(rules, cards, self.exclude_by_default)


# JSON key -> field; Orthanc's own keys are CamelCase, ours follow suit.
_KEYS = {
    "Enabled": "enabled",
    "ModelsDirectory": "models_directory",
    "Workers": "workers",
    "QueueDatabase": "queue_database",
    "MaxPixelBytes": "max_pixel_bytes",
    "MaxInstanceBytes": "max_instance_bytes",
    "TensorFlowThreads": "tensorflow_threads",
    "HttpTimeoutSeconds": "http_timeout_seconds",
    "MaxAttempts": "max_attempts",
    "RetryBackoffSeconds": "retry_backoff_seconds",
    "BatchSize": "batch_size",
    "BatchWaitMs": "batch_wait_ms",
    "Backend": "backend",
    "ModelServerUrl": "model_server_url",
    "ChangesPollSeconds": "changes_poll_seconds",
    "WorkerNice": "worker_nice",
    "NodeName": "node_name",
    "LeaseSeconds": "lease_seconds",
    "JobTimeoutSeconds": "job_timeout_seconds",
    "Routing": "routing_rules",
}
_SPECIAL = {"routing_rules", "exclude_by_default"}
assert set(_KEYS.values()) | _SPECIAL == {f.name for f in fields(AIConfig)}


def _parse_routing(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError("AI.Routing must be an object with Rules and ExcludeByDefault")
    unknown = sorted(set(value) - {"Rules", "ExcludeByDefault"})
    if unknown:
        raise ConfigError(f"unknown key(s) in AI.Routing: {unknown}")
    exclude = value.get("ExcludeByDefault", True)
    if not isinstance(exclude, bool):
        raise ConfigError("AI.Routing.ExcludeByDefault must be true or false")
    rules = value.get("Rules")
    if rules is None:
        parsed = None
    elif not isinstance(rules, list):
        raise ConfigError("AI.Routing.Rules must be a list of rules")
    else:
        try:
            parsed = tuple(Rule.from_json(r, i) for i, r in enumerate(rules))
        except RoutingError as exc:
            raise ConfigError(str(exc)) from exc
    return {"routing_rules": parsed, "exclude_by_default": exclude}


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise ConfigError(f"AI.{key} must be true or false, not {value!r}")
        return value
    if "Path" in annotation:
        if value is None and "None" in annotation:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"AI.{key} must be a non-empty path string, not {value!r}")
        path = Path(value)
        return path if path.is_absolute() else PROJECT_ROOT / path
    if annotation == "str":
        if not isinstance(value, str):
            raise ConfigError(f"AI.{key} must be a string, not {value!r}")
        return value.strip()
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"AI.{key} must be a non-negative integer, not {value!r}")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"AI.{key} must be a non-negative number, not {value!r}")
        return float(value)
    raise AssertionError(annotation)


def parse_ai_section(section: Any) -> AIConfig:
    """Validate the ``AI`` object of the Orthanc configuration."""
    if section is None:
        return AIConfig()
    if not isinstance(section, dict):
        raise ConfigError("AI must be a JSON object")
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in AI: {', '.join('AI.' + k for k in unknown)}; "
            f"valid keys: {', '.join(sorted(_KEYS))}"
        )
    values: dict[str, Any] = {}
    defaults = AIConfig()
    types = {f.name: str(f.type) for f in fields(AIConfig)}
    for key, value in section.items():
        name = _KEYS[key]
        if name == "routing_rules":
            values.update(_parse_routing(value))
            continue
        values[name] = _coerce(key, value, getattr(defaults, name), types[name])
    config = AIConfig(**values)
    if config.workers < 1:
        raise ConfigError("AI.Workers must be at least 1")
    for key, value in (("BatchSize", config.batch_size),
                       ("HttpTimeoutSeconds", config.http_timeout_seconds),
                       ("ChangesPollSeconds", config.changes_poll_seconds)):
        if value <= 0:
            raise ConfigError(f"AI.{key} must be greater than 0")
    if config.max_attempts < 1:
        raise ConfigError("AI.MaxAttempts must be at least 1")
    if config.job_timeout_seconds < 10:
        raise ConfigError("AI.JobTimeoutSeconds must be at least 10")
    if config.lease_seconds < 2:
        raise ConfigError("AI.LeaseSeconds must be at least 2")
    if config.worker_nice > 19:
        raise ConfigError("AI.WorkerNice must be between 0 and 19")
    if config.backend not in ("in-process", "http"):
        raise ConfigError("AI.Backend must be 'in-process' or 'http'")
    if config.model_server_url and not config.model_server_url.startswith(("http://",
                                                                           "https://")):
        raise ConfigError("AI.ModelServerUrl must be an http:// or https:// URL")
    return config


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
