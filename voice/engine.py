"""The engine: every model loaded once, and a fresh ``Session`` per conversation around them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from asr.stage import AsrModels, AsrStage
from llm.models import LlmModels
from llm.relay import Relay
from tts.stage import TtsModels, TtsStage
from turn.detector import TurnDetector, TurnModels
from voice.clock import Clock
from voice.cpu import CpuGate
from voice.session import Observer, Session, TurnRecord
from voice.settings import RelayMode, Settings


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        gate = CpuGate()  # recognition, turn-taking and synthesis first; the slow model waits
        self.asr_models = AsrModels(settings, gate)
        self.turn_models = TurnModels(settings, gate)
        self.llm_models = LlmModels(settings, gate)
        self.tts_models = TtsModels(settings, gate)

    def session(
        self,
        clock: Clock,
        input_rate: int = 16000,
        output_rate: int | None = None,
        mode: RelayMode | None = None,
        observer: Observer | None = None,
        on_record: Callable[[TurnRecord], None] | None = None,
    ) -> Session:
        """A new conversation: its own stages and history, the engine's models."""
        return Session(
            self,
            self.settings.session,
            clock,
            mode or self.settings.llm.mode,
            input_rate,
            output_rate or self.settings.session.output_rate,
            observer,
            on_record,
        )

    @property
    def prompt_cache_bytes(self) -> int:
        return self.llm_models.prompt_cache_bytes

    async def warm(self) -> None:
        """Run each model once (weights paged in, the system prompt in both LLMs' caches),
        so that the first reply of the first conversation is not the slow one."""
        await self.llm_models.warm()
        silence = np.zeros(16000, np.float32)
        await asyncio.to_thread(self.turn_models.audio.p_complete, silence)
        await asyncio.to_thread(self.tts_models.voice.synthesize, "Hello.")

    # --- the stage factories a Session asks for ------------------------------------------------

    def asr(self, clock: Clock, emit: Observer, input_rate: int) -> AsrStage:
        return self.asr_models.stage(clock, emit, input_rate)

    def turn(self, clock: Clock, emit: Observer, input_rate: int) -> TurnDetector:
        return self.turn_models.detector(clock, emit, input_rate)

    def relay(self, clock: Clock, emit: Observer, mode: RelayMode) -> Relay:
        return self.llm_models.relay(clock, emit, mode)

    def voice(self, clock: Clock, emit: Observer, output_rate: int) -> TtsStage:
        return self.tts_models.stage(clock, emit, output_rate)

    def close(self) -> None:
        self.llm_models.close()
        self.tts_models.close()
