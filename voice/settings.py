"""The one settings schema: every model choice, thread budget and threshold lives here.

Precedence, lowest to highest: defaults in code < TOML file < environment < CLI flags.

- TOML: ``[asr]\\nthreads = 2`` (file from ``--config`` or ``RELAYVOICE_CONFIG``).
- Environment: ``RELAYVOICE_ASR__THREADS=2`` (section and field joined by a double underscore).
- CLI: ``--set asr.threads=2`` (repeatable).

Unknown sections or fields and values of the wrong type fail with one clear message, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "RELAYVOICE_"
CONFIG_ENV = "RELAYVOICE_CONFIG"


class SettingsError(ValueError):
    """A setting could not be read: unknown key, bad value or unreadable file."""


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "relayvoice"


def _default_transcripts() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "relayvoice" / "transcripts.sqlite3"


@dataclass
class ModelSettings:
    """Where model files live and how they are checked."""

    # Split model files are joined once into this directory (by `make setup`).
    cache_dir: Path = field(default_factory=_default_cache_dir)
    # Per-role path to a user's own file instead of the packaged one (no hash check possible).
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass
class AudioSettings:
    """Internal audio format: every stage sees mono float32 at this rate."""

    sample_rate: int = 16000
    frame_ms: int = 20


@dataclass
class VadSettings:
    """Silero VAD with a WebRTC pre-gate; times are multiples of its 32 ms window."""

    threshold: float = 0.5  # P(speech) at or above which a window is speech
    release_threshold: float = 0.35  # below this a window is silence (hysteresis between)
    start_ms: int = 64  # speech needed before speech-started (ignores clicks)
    hangover_ms: int = 32  # silence before speech-ended (a pause, not yet a turn end)
    # Silero hears speech for ~100 ms after it stops. A window whose last 16 ms are this much
    # quieter (RMS) than the segment's loudest window is marked quiet, and the final decode
    # starts there instead of waiting for Silero. 0 turns it off.
    quiet_ratio: float = 0.03
    webrtc_mode: int = 1  # pre-gate aggressiveness 0-3 while idle; -1 turns the gate off


@dataclass
class AsrSettings:
    model: Literal["asr", "asr-accurate"] = "asr"
    threads: int = 1
    language: str = "en"
    partial_interval_ms: int = 250  # new audio between two partial transcripts
    max_window_s: float = 6.0  # longest audio one decode sees; older committed audio is dropped
    # A segment up to this long is decoded whole again for its final transcript, so words that
    # partials committed early can still be corrected; 0: only the words not yet committed.
    final_redecode_s: float = 6.0
    context_words: int = 40  # earlier transcript words given to the decoder as its prompt
    pre_roll_ms: int = 320  # audio before the VAD's speech start that a decode still sees
    rejoin_ms: int = 1500  # speech resuming within this pause is decoded with the audio before it
    tail_pad_ms: int = 500  # silence appended to each window so Whisper does not invent an ending
    max_tokens_per_second: float = 7.0  # cap on decoded length: fast speech is ~5 tokens/s
    no_speech_threshold: float = 0.6  # with a low log-probability: the window holds no speech
    logprob_threshold: float = -1.0


RelayMode = Literal["relay", "cascaded", "fast"]


@dataclass
class LlmSettings:
    mode: RelayMode = "relay"  # cascaded: slow model alone; fast: drafter alone
    system_prompt: str = (
        "You are a friendly voice assistant in a spoken conversation. Answer in one to three "
        "short sentences of plain spoken English: no lists, no markdown, no emoji."
    )
    max_reply_tokens: int = 80
    max_user_words: int = 300  # longer turns keep only their last words in the prompt
    first_token_timeout_s: float = 10.0  # a backend silent this long ends the reply (with a reason)
    # The same, between two tokens. Replies on a shared model take turns (~0.8 s each, see
    # llm.backend.QUANTUM_TOKENS), so a wait of a few seconds under load is no stall; eval
    # load at 4 conversations ended replies that waited past 2 s.
    token_timeout_s: float = 10.0
    # A reply whose model failed (raised or timed out) before it said anything says this.
    apology: str = "Sorry, something went wrong on my side. Could you say that again?"
    final_transcript_wait_s: float = 1.0  # the slow path waits this long for the final transcript
    draft_max_words: int = 5  # a prefix ends at its first punctuation or after this many words
    # ... but not before this many: while one word ("No.", 0.4 s of speech) plays, the slow
    # model cannot write its first clause (eval relay: 2 of 24 kept turns with a gap).
    draft_min_words: int = 2
    draft_max_tokens: int = 12
    draft_history_turns: int = 2  # earlier exchanges the drafter sees (it is small; keep it short)
    # A draft made at a pause still opens the reply when the turn's words grew by at most this.
    speculation_missing_words: int = 2
    draft_model: Literal["draft-llm", "small-llm"] = "draft-llm"
    slow_model: Literal["slow-llm", "small-llm"] = "slow-llm"
    draft_threads: int = 1
    slow_threads: int = 2
    context_tokens: int = 2048
    # Per model: the KV states of conversations its one context turned away from, so that
    # coming back to one restores it (~5 ms) instead of reading it again (~4 s for 400
    # tokens of the 1.5B model). About 29 KB a token for the 1.5B model, 23 for the 135M:
    # four conversations of 1,000 tokens each fit.
    prompt_cache_mb: int = 128
    # The slow model on an OpenAI-compatible server instead of in-process (llm/http_backend.py).
    slow_backend: Literal["llama", "http"] = "llama"  # http: the http_* settings below apply
    http_base_url: str = "http://127.0.0.1:8000/v1"  # the server's API root
    http_model: str = ""  # model name sent with each request; empty: the server's default
    http_api_key: str = ""  # sent as a Bearer token when set
    http_timeout_s: float = 10.0  # connect timeout, and the longest wait for the next bytes
    # A Jinja2 chat-template file: prompts are rendered here and sent to /completions, for
    # servers that cannot continue a chat message (llama-cpp-python's); empty: chat API.
    http_chat_template: str = ""


@dataclass
class TurnSettings:
    """End of turn: silence after speech, the longer the less P(complete) the models give.

    Silence is counted from where the VAD heard speech stop. The turn ends after
    ``min_silence_ms + (max_silence_ms - min_silence_ms) * (1 - p) ** silence_curve`` of it,
    where p fuses the audio model (intonation) and the text model (wording).
    """

    mode: Literal["adaptive", "fixed"] = "adaptive"  # fixed: plain VAD timeout, no models
    fixed_silence_ms: int = 800  # the timeout in fixed mode (pipecat's default VAD stop)
    # The four below were chosen on `relayvoice eval turn --split tune` (python -m eval.turn_tune).
    audio_weight: float = 0.85  # share of the audio model in p; the text model has the rest
    maybe_threshold: float = 0.5  # p at a pause from which turn-maybe-ended fires
    min_silence_ms: int = 0  # what a certain p = 1 still waits (the evidence itself takes ~200 ms)
    max_silence_ms: int = 2000  # hard maximum, whatever the models say
    silence_curve: float = 1.0  # > 1: a fairly confident p already waits little
    audio_model_threads: int = 1


@dataclass
class TtsSettings:
    """Streaming synthesis: which voice, and how a streamed reply is cut into chunks."""

    voice: Literal["tts-voice", "espeak"] = "tts-voice"  # espeak: Debian espeak-ng, no model
    threads: int = 2  # Piper: 67 ms for a short phrase on 2, 114 on 1 (the slow model waits)
    first_chunk_words: int = 4  # a reply's first chunk ends at its first clause or this many words
    chunk_min_words: int = 8  # later chunks end at a clause boundary with at least this many words
    chunk_max_words: int = 15  # longest chunk (cut at a space), so run-on text still streams


@dataclass
class SessionSettings:
    """Full duplex: when the user's speech over a reply stops it."""

    # Speech over a reply pauses it at once; these many words (not backchannels, not our own
    # echo) make it an interruption, and no words within the window resume the reply.
    interrupt_min_words: int = 1
    false_interruption_ms: int = 1200
    backchannels: str = "mm-hm, mhm, mm, hmm, uh-huh, yeah, yes, yep, right, okay, ok, sure, i see"
    output_rate: int = 24000  # assistant audio rate when the caller does not say (talk, eval)
    max_errors: int = 3  # failed replies after which the conversation is closed, with the reason


@dataclass
class ServerSettings:
    """`relayvoice serve`: where it listens and whom it lets in."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""  # bearer token clients must send; required off loopback
    allowed_origins: str = ""  # comma-separated origins besides the page's own
    # Concurrent conversations; beyond: session_limit_reached. Measured (eval load --quick, 2
    # cores, real models): at 2 the shared slow model falls behind (11 of 13 replies stalled).
    max_sessions: int = 1
    # New conversations wait while the ones in progress fall behind real time: recognition
    # (median delay from end of speech to final transcript, worst conversation) or the loop.
    admit_transcript_delay_ms: float = 1000.0
    admit_loop_lag_ms: float = 250.0
    max_message_bytes: int = 1 << 20  # one websocket message (1 MiB: ~20 s of 24 kHz base64)
    idle_timeout_s: float = 300.0  # a connection with no input this long is closed
    # Every conversation's turns, written as they happen (SQLite, WAL): `relayvoice sessions`.
    transcripts: Path = field(default_factory=_default_transcripts)
    shutdown_grace_s: float = 10.0  # on SIGTERM, replies in progress get this long to finish


@dataclass
class EmbeddingSettings:
    threads: int = 1


@dataclass
class Settings:
    models: ModelSettings = field(default_factory=ModelSettings)
    audio: AudioSettings = field(default_factory=AudioSettings)
    vad: VadSettings = field(default_factory=VadSettings)
    asr: AsrSettings = field(default_factory=AsrSettings)
    turn: TurnSettings = field(default_factory=TurnSettings)
    llm: LlmSettings = field(default_factory=LlmSettings)
    tts: TtsSettings = field(default_factory=TtsSettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)

    @classmethod
    def load(
        cls,
        config_file: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Iterable[str] = (),
    ) -> Settings:
        """Build settings from defaults, then the TOML file, the environment and CLI overrides."""
        env = os.environ if env is None else env
        settings = cls()
        config_file = config_file or env.get(CONFIG_ENV)
        if config_file:
            settings._apply_mapping(_read_toml(Path(config_file)), origin=str(config_file))
        for name, value in sorted(env.items()):
            if name.startswith(ENV_PREFIX) and name != CONFIG_ENV:
                key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
                settings.set(key, value, origin=f"environment variable {name}")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise SettingsError(f"--set expects section.field=value, got {item!r}")
            settings.set(key.strip(), value.strip(), origin=f"--set {item}")
        return settings

    def set(self, key: str, value: object, origin: str = "code") -> None:
        """Set ``section.field`` (or ``section.table.key``) from a raw value, coercing its type."""
        parts = key.split(".")
        if len(parts) < 2:
            raise SettingsError(f"{origin}: setting {key!r} must look like section.field")
        section = self._section(parts[0], origin)
        fields = {f.name: f for f in dataclasses.fields(section)}
        name = parts[1]
        if name not in fields:
            raise SettingsError(
                f"{origin}: unknown setting {parts[0]}.{name}; "
                f"known: {', '.join(parts[0] + '.' + n for n in fields)}"
            )
        hint = typing.get_type_hints(type(section))[name]
        if len(parts) > 2:
            if typing.get_origin(hint) is not dict:
                raise SettingsError(f"{origin}: {parts[0]}.{name} has no sub-keys")
            getattr(section, name)[".".join(parts[2:]).replace("_", "-")] = str(value)
            return
        setattr(section, name, _coerce(value, hint, f"{origin}: {parts[0]}.{name}"))

    def _section(self, name: str, origin: str) -> Any:
        sections = [f.name for f in dataclasses.fields(self)]
        if name not in sections:
            raise SettingsError(
                f"{origin}: unknown settings section {name!r}; known: {', '.join(sections)}"
            )
        return getattr(self, name)

    def _apply_mapping(self, data: Mapping[str, Any], origin: str) -> None:
        for section_name, values in data.items():
            if not isinstance(values, Mapping):
                raise SettingsError(f"{origin}: [{section_name}] must be a table")
            for name, value in values.items():
                if isinstance(value, Mapping):
                    for sub, sub_value in value.items():
                        self.set(f"{section_name}.{name}.{sub}", sub_value, origin)
                else:
                    self.set(f"{section_name}.{name}", value, origin)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain, TOML/JSON-friendly view (paths as strings, secrets hidden)."""
        out: dict[str, dict[str, Any]] = {}
        for section in dataclasses.fields(self):
            values = dataclasses.asdict(getattr(self, section.name))
            out[section.name] = {
                k: "<set>" if _secret(k) and v else str(v) if isinstance(v, Path) else v
                for k, v in values.items()
            }
        return out


def _secret(name: str) -> bool:
    return name.endswith(("api_key", "token"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: object, hint: Any, where: str) -> Any:
    """Turn a raw TOML/env/CLI value into the field's declared type, or fail clearly."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise SettingsError(
                f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}"
            )
        return value
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in {"", "none"}):
            return None
        return _coerce(value, inner[0], where)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where} must be a table, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise SettingsError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise SettingsError(f"{where} must be {hint.__name__}, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where} must be {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise SettingsError(f"{where} must be a whole number, got {value!r}")
        return number
    if hint is Path:
        return Path(str(value)).expanduser()
    if hint is str:
        return str(value)
    raise SettingsError(f"{where}: unsupported setting type {hint!r}")
