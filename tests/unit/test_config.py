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
        ({"BatchSize": 0}, "AI.BatchSize"),
        ({"ChangesPollSeconds": 0}, "AI.ChangesPollSeconds"),
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
