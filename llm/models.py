"""The responder's models, loaded once: the drafter's and the continuer's llama.cpp
instances (the continuer may instead be on an HTTP server), and the verifier with its
embedding model."""

from __future__ import annotations

import dataclasses
import logging

from llm.backend import BackendError, LlamaBackend, Message
from llm.drafter import LlamaDrafter
from llm.http_backend import HttpBackend
from llm.relay import Emit, Relay
from llm.verifier import Verifier, VerifierModel
from voice.clock import Clock
from voice.cpu import CpuGate
from voice.embedding import TextEmbedder
from voice.models import resolve
from voice.settings import RelayMode, Settings

log = logging.getLogger(__name__)


class LlmModels:
    def __init__(self, settings: Settings, gate: CpuGate | None = None) -> None:
        """``gate``: the slow model's generation steps aside for urgent work (voice.cpu)."""
        s = settings.llm
        self.settings = settings
        self._gate = gate
        self.draft = LlamaBackend(
            "draft",
            resolve(s.draft_model, settings).path,
            s.draft_threads,
            s.context_tokens,
            prompt_cache_mb=s.prompt_cache_mb,
        )
        self.slow: LlamaBackend | HttpBackend = (
            HttpBackend.from_settings("slow", s)
            if s.slow_backend == "http"
            else LlamaBackend(
                "slow",
                resolve(s.slow_model, settings).path,
                s.slow_threads,
                s.context_tokens,
                gate=gate,
                prompt_cache_mb=s.prompt_cache_mb,
            )
        )
        embedder = TextEmbedder(resolve("embedding", settings).path, settings.embedding.threads)
        self.verifier = Verifier(VerifierModel.load(), embedder)
        self.drafter = LlamaDrafter(self.draft, s)

    def relay(self, clock: Clock, emit: Emit, mode: RelayMode | None = None) -> Relay:
        """A responder for one conversation (its own history; the models are shared)."""
        settings = self.settings.llm
        if mode is not None:
            settings = dataclasses.replace(settings, mode=mode)
        return Relay(settings, self.drafter, self.verifier, self.slow, clock, emit, self._gate)

    async def warm(self) -> None:
        """Each model once (weights paged in, the system prompt in both LLMs' caches), so
        that the first reply is not the slow one. A remote slow model that is down is only
        logged: its replies will apologise."""
        system = [Message(role="system", content=self.settings.llm.system_prompt)]
        await self.drafter.prefill(system)
        await self.verifier.read(system, "Hello there.")
        try:
            await self.slow.prefill(system)
        except BackendError as exc:
            log.warning("the slow model is not answering: %s", exc)

    @property
    def prompt_cache_bytes(self) -> int:
        """The saved prompts of both models, together (llm.prompt_cache)."""
        backends = (self.draft, self.slow)
        return sum(b.prompt_cache.bytes for b in backends if isinstance(b, LlamaBackend))

    def close(self) -> None:
        self.draft.close()
        self.slow.close()
