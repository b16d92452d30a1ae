import json
from pathlib import Path

import pytest

from voice.settings import Settings, SettingsError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relayvoice.toml"
    path.write_text(text)
    return path


def test_defaults_come_from_code():
    s = Settings.load(env={})
    assert s.asr.model == "asr" and s.audio.sample_rate == 16000
    assert s.llm.slow_model == "slow-llm"


def test_precedence_is_defaults_then_file_then_env_then_cli(tmp_path):
    config = write(tmp_path, "[asr]\nthreads = 2\nlanguage = 'de'\n[llm]\ndraft_threads = 2\n")
    env = {"RELAYVOICE_ASR__THREADS": "3", "RELAYVOICE_LLM__SLOW_THREADS": "1"}
    s = Settings.load(config, env=env, overrides=["asr.threads=4"])
    assert s.asr.threads == 4  # CLI beats env beats file
    assert s.llm.slow_threads == 1  # env beats default
    assert s.llm.draft_threads == 2  # file beats default
    assert s.asr.language == "de"
    assert Settings.load(config, env=env).asr.threads == 3
    assert Settings.load(config, env={}).asr.threads == 2


def test_config_file_can_come_from_the_environment(tmp_path):
    config = write(tmp_path, "[tts]\nthreads = 2\n")
    assert Settings.load(env={"RELAYVOICE_CONFIG": str(config)}).tts.threads == 2


def test_paths_and_per_role_overrides(tmp_path):
    config = write(
        tmp_path,
        f"[models]\ncache_dir = '{tmp_path}'\n[models.overrides]\nslow-llm = '/m/a.gguf'\n",
    )
    env = {"RELAYVOICE_MODELS__OVERRIDES__DRAFT_LLM": "/m/b.gguf"}
    s = Settings.load(config, env=env)
    assert s.models.cache_dir == tmp_path
    assert s.models.overrides == {"slow-llm": "/m/a.gguf", "draft-llm": "/m/b.gguf"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("asr.threads=two", "asr.threads must be int"),
        ("asr.threads=1.5", "asr.threads must be int"),
        ("asr.model=large", "must be one of asr, asr-accurate"),
        ("asr.nope=1", "unknown setting asr.nope; known: asr.model"),
        ("nosuch.x=1", "unknown settings section 'nosuch'"),
        ("asr=1", "section.field"),
        ("asr.threads", "section.field=value"),
        ("asr.threads.x=1", "has no sub-keys"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(SettingsError, match=message):
        Settings.load(env={}, overrides=[override])


def test_bad_env_and_file_name_their_origin(tmp_path):
    with pytest.raises(SettingsError, match="RELAYVOICE_ASR__THREADS"):
        Settings.load(env={"RELAYVOICE_ASR__THREADS": "x"})
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load(write(tmp_path, "[asr\n"), env={})
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(tmp_path / "missing.toml", env={})
    with pytest.raises(SettingsError, match="must be a table"):
        Settings.load(write(tmp_path, "asr = 3\n"), env={})
    with pytest.raises(SettingsError, match="must be int"):
        Settings.load(write(tmp_path, "[asr]\nthreads = true\n"), env={})


def test_as_dict_is_plain_data():
    d = Settings.load(env={}).as_dict()
    assert isinstance(d["models"]["cache_dir"], str) and d["asr"]["threads"] == 1


def test_the_printed_settings_hide_the_api_key():
    settings = Settings.load(env={"RELAYVOICE_LLM__HTTP_API_KEY": "sk-secret"})
    assert settings.llm.http_api_key == "sk-secret"
    assert "sk-secret" not in json.dumps(settings.as_dict())
