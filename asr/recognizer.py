"""The streaming recogniser's bookkeeping: which audio the next decode sees, what is committed.

Decoding itself is a pure function (``WhisperDecoder.decode``) run on a worker thread; this
class only builds requests and applies their results, on the event loop's thread, so it has
no locks and is tested with scripted hypotheses.

Compute per step is bounded by design: a decode sees at most ``max_window_s`` of audio (plus
one partial interval); words already known inside the window are forced as a decoder prefix
rather than generated again; older audio is trimmed away, its words becoming the prompt.

Speech that resumes shortly after a pause is decoded together with the audio before the pause
(those words forced as the prefix), so a hesitation does not cost Whisper its context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from asr.agreement import LocalAgreement
from asr.whisper import SAMPLE_RATE, DecodeRequest, Hypothesis
from voice.events import Word
from voice.settings import AsrSettings

_TRIM_MARGIN_S = 0.1  # kept before the last committed word when trimming; decoded past an end
_MARGIN_SAMPLES = round(_TRIM_MARGIN_S * SAMPLE_RATE)


def join_words(words: list[Word] | tuple[Word, ...]) -> str:
    return "".join(w.text for w in words).strip()


@dataclass(frozen=True)
class PartialResult:
    committed: list[Word]
    tentative: list[Word]


@dataclass(frozen=True)
class PendingFinal:
    """A closed segment waiting for its last decode; new speech may already have begun."""

    request: DecodeRequest
    agreement: LocalAgreement
    whole: bool  # the request decodes the whole segment again: its words replace the committed


class StreamingRecognizer:
    def __init__(self, settings: AsrSettings) -> None:
        self._settings = settings
        self._interval = int(settings.partial_interval_ms * SAMPLE_RATE / 1000)
        self._max_window = int(settings.max_window_s * SAMPLE_RATE)
        self._pre_roll = int(settings.pre_roll_ms * SAMPLE_RATE / 1000)
        self._rejoin = int(settings.rejoin_ms * SAMPLE_RATE / 1000)
        self._history: list[Word] = []  # committed words of finished segments
        self._active = False
        self._pending = 0  # closed segments whose final decode is not back yet
        self._last_end = -(10**9)  # stream sample where the last segment ended
        self._began = 0  # stream sample where the current segment's speech began
        self._chunks: list[np.ndarray] = []
        self._start = 0  # stream sample index of the buffer's first sample
        self._length = 0
        self._requested_at = 0  # buffer end when the last partial was asked for
        self._agreement = LocalAgreement()
        self.segment = 0  # increases with every speech segment; stale results are dropped

    @property
    def active(self) -> bool:
        return self._active

    @property
    def end_sample(self) -> int:
        return self._start + self._length

    def add(self, samples: np.ndarray) -> None:
        """Every window of the stream, speech or not: idle audio is kept for pre-roll/rejoin."""
        self._chunks.append(samples)
        self._length += len(samples)
        if not self._active:
            keep = max(self._pre_roll, self._rejoin + self._pre_roll)
            if self._length > 2 * keep:
                self._cut(self._length - keep)

    def start_segment(self, speech_time: float) -> None:
        """Speech began at ``speech_time`` (stream seconds); its audio was already ``add``ed."""
        began = round(speech_time * SAMPLE_RATE)
        if began - self._last_end > self._rejoin:
            self._cut(max(0, began - self._pre_roll - self._start))
        self._began = began
        self._active = True
        self.segment += 1
        self._agreement = LocalAgreement()
        self._requested_at = self._start

    def _cut(self, count: int) -> None:
        """Drop the first ``count`` samples of the buffer."""
        if count <= 0:
            return
        audio = self._window()[count:]
        self._chunks, self._start, self._length = [audio], self._start + count, len(audio)

    def _window(self, end_sample: int | None = None) -> np.ndarray:
        if len(self._chunks) != 1:
            self._chunks = [
                np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
            ]
        audio = self._chunks[0]
        stop = (
            self._length
            if end_sample is None
            else max(0, min(self._length, end_sample - self._start))
        )
        return audio[:stop]

    def _request(self, end_sample: int | None = None) -> DecodeRequest:
        first = self._start
        if self._pending:
            # Words of a closed segment whose final is not back are not known yet: a decode
            # that heard that audio again would write them twice ("Please," "Please enter").
            first = max(first, min(self._last_end + _MARGIN_SAMPLES, self._began))
        offset = first / SAMPLE_RATE
        known = self._history + self._agreement.committed
        prefix = tuple(w for w in known if w.end > offset)
        earlier = [w for w in known if w.end <= offset][-self._settings.context_words :]
        audio = self._window(end_sample)[first - self._start :]
        return DecodeRequest(audio.copy(), offset, join_words(earlier), prefix)

    def partial_request(self) -> DecodeRequest | None:
        """A request when a partial interval of new audio has arrived since the last one, and
        no earlier segment still waits for its final (its words become this one's prefix)."""
        if (
            not self._active
            or self._pending
            or self.end_sample - self._requested_at < self._interval
        ):
            return None
        self._requested_at = self.end_sample
        return self._request()

    def final_request(self, end_time: float) -> DecodeRequest:
        """Everything not yet committed, up to where speech ended (plus a small margin). A
        segment no longer than ``final_redecode_s`` whose audio is all in the window is decoded
        whole instead, nothing forced: the final may correct words that partials committed
        from too little audio ("how do i am" for "oh i'm")."""
        request = self._request(round((end_time + _TRIM_MARGIN_S) * SAMPLE_RATE))
        committed = tuple(self._agreement.committed)
        short = request.end - request.offset <= self._settings.final_redecode_s
        if committed and request.prefix == committed and short:
            return replace(request, prefix=())
        return request

    def _decodes_whole(self, request: DecodeRequest) -> bool:
        """Whether ``request`` (a final one) decodes the segment whole: words are committed
        inside its window, yet none is forced."""
        committed = self._agreement.committed
        return bool(committed) and not request.prefix and committed[0].end > request.offset

    def apply_partial(self, segment: int, hypothesis: Hypothesis) -> PartialResult | None:
        """Apply a partial decode, unless its segment has ended meanwhile."""
        if segment != self.segment or not self._active:
            return None
        self._agreement.update(hypothesis.words)
        self._trim()
        return PartialResult(list(self._agreement.committed), self._agreement.tentative)

    def close(self, end_time: float, request: DecodeRequest | None = None) -> PendingFinal:
        """Speech ended: detach the segment (with ``request`` if one was already decoded
        speculatively for this end) so that new speech can start while it is finalised."""
        request = request or self.final_request(end_time)
        pending = PendingFinal(request, self._agreement, self._decodes_whole(request))
        self._active = False
        self._pending += 1
        self._last_end = round(end_time * SAMPLE_RATE)
        return pending

    def tail_final(self, pending: PendingFinal) -> PendingFinal:
        """For a whole decode that came back empty (failed, or rejected as a loop): decode
        only what follows the committed words, forced as the prefix, so the words spoken
        after them are not lost."""
        request = replace(pending.request, prefix=tuple(pending.agreement.committed))
        return replace(pending, request=request, whole=False)

    def complete(self, pending: PendingFinal, hypothesis: Hypothesis) -> list[Word]:
        """Commit the final hypothesis of a closed segment; return all of its words. A whole
        decode that came back empty (failed, or rejected as noise) keeps the committed words."""
        pending.agreement.finish(hypothesis.words, pending.whole and bool(hypothesis.words))
        words = list(pending.agreement.committed)
        self._history = (self._history + words)[-max(self._settings.context_words, 200) :]
        self._pending -= 1
        return words

    def _trim(self) -> None:
        """Keep the window bounded: drop audio before the last committed word."""
        if self._length <= self._max_window:
            return
        if self._length > 2 * self._max_window:
            # Nothing has agreed for too long: accept the current hypothesis but its last word.
            self._agreement.force(self._agreement.tentative[:-1])
        known = self._history + self._agreement.committed
        cut = round((known[-1].start - _TRIM_MARGIN_S) * SAMPLE_RATE) - self._start if known else 0
        if self._length - max(cut, 0) > 2 * self._max_window:
            cut = self._length - self._max_window  # no words to cut at (noise?): bound it anyway
        self._cut(cut)
