from pathlib import Path

import pytest

from engine.config import PROJECT_ROOT, AIConfig, ConfigError, load_orthanc_json, parse_ai_section


def test_defaults_when_section_absent():
    assert parse_ai_section(None) == AIConfig()


def test_values_are_parsed_and_paths_resolved():
    cfg = parse_ai_section({"Workers": 3, "ModelsDirectory": "models", "RetryBackoffSeconds": 1})
    assert cfg.workers == 3
    assert cfg.models_directory == PROJECT_ROOT / "models"
    assert cfg.retry_backoff_seconds == 1.0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"Workerz": 1}, "AI.Workerz"),
        ({"Workers": "2"}, "AI.Workers"),
        ({"Workers": 0}, "AI.Workers"),
        ({"Enabled": "yes"}, "AI.Enabled"),
        ({"ModelsDirectory": ""}, "AI.ModelsDirectory"),
        ({"MaxPixelBytes": -1}, "AI.MaxPixelBytes"),
        ({"IngestQuietMs": 300}, "AI.IngestQuietMs"),  # removed: the OS protects ingest
        ({"LeaseSeconds": 1}, "AI.LeaseSeconds"),
        ({"JobTimeoutSeconds": 5}, "AI.JobTimeoutSeconds"),
        ({"WorkerScheduling": "fast"}, "AI.WorkerScheduling"),
        ({"BatchSize": 0}, "AI.BatchSize"),
        ({"ChangesPollSeconds": 0}, "AI.ChangesPollSeconds"),
        ({"HttpTimeoutSeconds": 0}, "AI.HttpTimeoutSeconds"),
        ({"MaxAttempts": 0}, "AI.MaxAttempts"),
        ({"WorkerNice": 20}, "AI.WorkerNice"),
        ({"WorkerNice": -1}, "AI.WorkerNice"),
        ({"Workers": True}, "AI.Workers"),  # strict: true is not 1
        ({"RetryBackoffSeconds": False}, "AI.RetryBackoffSeconds"),
        ({"Enabled": 1}, "AI.Enabled"),
        ({"Backend": "grpc"}, "AI.Backend"),
        ({"ModelServerUrl": "ftp://server"}, "AI.ModelServerUrl"),
        ({"QueueDatabase": "mysql://db/ai"}, "AI.QueueDatabase"),
        ({"NodeName": 3}, "AI.NodeName"),
        ({"Routing": []}, "AI.Routing"),
        ({"Routing": {"ExcludeByDefault": "no"}}, "AI.Routing.ExcludeByDefault"),
        ([], "JSON object"),
    ],
)
def test_errors_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_ai_section(section)


def test_shipped_orthanc_json_is_valid():
    config = load_orthanc_json(PROJECT_ROOT / "orthanc.json")
    parse_ai_section(config["AI"])


def test_comments_are_allowed_like_orthanc(tmp_path: Path):
    path = tmp_path / "o.json"
    path.write_text('{ // a comment\n "Name": "a // not a comment", /* block */ "AI": {}}')
    assert load_orthanc_json(path)["Name"] == "a // not a comment"


def test_unknown_keys_are_listed_with_the_valid_ones():
    valid = "valid keys: Administrators, Audit, Backend, .*Workers"
    with pytest.raises(ConfigError, match=f"AI.Foo, AI.Workerz; {valid}"):
        parse_ai_section({"Workerz": 1, "Foo": 2})
    with pytest.raises(ConfigError, match="AI.workers"):  # the key is CamelCase
        parse_ai_section({"workers": 1})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_ai_section({"Workers": 0, "BatchSize": 0, "Backend": "grpc"})
    assert all(f"AI.{key}" in str(info.value) for key in ("Workers", "BatchSize", "Backend"))


def test_valid_values_and_defaults():
    cfg = parse_ai_section({
        "Enabled": False, "LeaseSeconds": 2, "WorkerNice": 0, "Backend": "http",
        "ModelServerUrl": "https://models:8501", "QueueDatabase": "postgresql://ai@db/ai",
        "Routing": {"ExcludeByDefault": False},
    })
    assert (cfg.enabled, cfg.lease_seconds, cfg.worker_nice) == (False, 2.0, 0)
    assert cfg.queue_location(Path("/s")) == "postgresql://ai@db/ai"
    assert cfg.exclude_by_default is False and cfg.routing_rules is None
    default = AIConfig()
    assert default.queue_location(Path("/s")) == Path("/s/orthanc-ai/jobs.sqlite")
    assert (default.workers, default.batch_size, default.backend) == (1, 8, "in-process")
    assert parse_ai_section({"QueueDatabase": "db/jobs.sqlite"}).queue_location(Path("/s")) \
        == PROJECT_ROOT / "db" / "jobs.sqlite"


def test_config_is_frozen():
    cfg = parse_ai_section({})
    with pytest.raises(ValueError, match="frozen"):
        cfg.workers = 2
