import numpy as np
import pytest

from voice.audio import (
    AudioFormatError,
    Framer,
    RingBuffer,
    StreamResampler,
    check_rate,
    float32_to_pcm16,
    pcm16_to_float32,
    read_wav,
    resample,
    write_wav,
)


def sine(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_pcm16_round_trip_is_exact_for_every_int16_value():
    values = np.arange(-32768, 32768, dtype=np.int16)
    back = np.frombuffer(float32_to_pcm16(pcm16_to_float32(values.tobytes())), dtype="<i2")
    assert np.array_equal(back, values)


def test_pcm16_clips_out_of_range_floats():
    pcm = np.frombuffer(float32_to_pcm16(np.array([2.0, -2.0, 0.0], dtype=np.float32)), "<i2")
    assert pcm.tolist() == [32767, -32768, 0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01\x02", "even number of bytes"),
        (np.zeros(4, dtype=np.int32), "dtype int16"),
    ],
)
def test_bad_pcm16_is_rejected_clearly(data, message):
    with pytest.raises(AudioFormatError, match=message):
        pcm16_to_float32(data)


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (np.array([0.0, np.nan], dtype=np.float32), "NaN"),
        (np.array([np.inf], dtype=np.float32), "infinite"),
        (np.zeros((2, 10), dtype=np.float32), "mono"),
        (np.zeros(10, dtype=np.int16), "float samples"),
    ],
)
def test_unusable_float_audio_is_rejected_clearly(samples, message):
    with pytest.raises(AudioFormatError, match=message):
        float32_to_pcm16(samples)


@pytest.mark.parametrize("rate", [11025, 0, -16000, 16000.0, "16000", True])
def test_unsupported_rates_are_rejected_with_the_supported_list(rate):
    with pytest.raises(AudioFormatError, match="supported: 8000, 16000"):
        check_rate(rate)
    with pytest.raises(AudioFormatError):
        resample(np.zeros(160, dtype=np.float32), rate, 16000)


@pytest.mark.parametrize(
    ("src", "dst"), [(16000, 48000), (48000, 16000), (8000, 24000), (22050, 16000)]
)
def test_resample_round_trip_keeps_the_signal(src, dst):
    x = sine(440, src, 0.5)
    y = resample(x, src, dst)
    assert abs(len(y) - len(x) * dst / src) <= 1
    back = resample(y, dst, src)
    core = slice(len(x) // 10, -len(x) // 10)  # the filter's edges are not the point
    assert np.max(np.abs(back[core] - x[: len(back)][core])) < 0.01


def test_stream_resampler_matches_one_shot_with_odd_chunks():
    x = sine(300, 48000, 1.0)
    stream = StreamResampler(48000, 16000)
    pieces, start = [], 0
    for size in [1, 7, 333, 960, 4801, 1023] * 20:
        if start >= len(x):
            break
        pieces.append(stream.process(x[start : start + size]))
        start += size
    pieces.append(stream.process(x[start:]))
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces)
    whole = resample(x, 48000, 16000)
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    assert np.max(np.abs(streamed[1000 : n - 1000] - whole[1000 : n - 1000])) < 1e-3


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_stream_resampler_holds_back_only_its_lookahead(rate):
    # Every VAD window waits for the resampler: soxr's stream held back 63 ms of 8 kHz on average.
    stream = StreamResampler(rate, 16000)
    step, fed, out, held = rate // 50, 0, 0, []
    x = sine(440, rate, 1.0)
    for i in range(0, len(x), step):
        out += len(stream.process(x[i : i + step]))
        fed += len(x[i : i + step])
        held.append(fed / rate - out / 16000)
    block = rate // np.gcd(rate, 16000) / rate  # input is taken in whole blocks (10 ms at 44.1 kHz)
    assert max(held) <= StreamResampler.LOOKAHEAD_S + block + 1e-3
    assert out + len(stream.flush()) == len(resample(x, rate, 16000))


def test_stream_resampler_refuses_audio_after_its_end():
    stream = StreamResampler(8000, 16000)
    stream.process(sine(100, 8000, 0.1), last=True)
    with pytest.raises(ValueError, match="flushed"):
        stream.process(sine(100, 8000, 0.02))


def test_stream_resampler_same_rate_passes_through():
    x = sine(100, 16000, 0.1)
    assert np.array_equal(StreamResampler(16000, 16000).process(x), x)


def test_framer_cuts_odd_chunks_into_exact_frames_and_pads_the_tail():
    framer = Framer(320)
    x = np.arange(1000, dtype=np.float32) / 1000
    frames = []
    for chunk in np.split(x, [1, 50, 51, 700]):
        frames += framer.push(chunk)
    assert [len(f) for f in frames] == [320, 320, 320]
    assert framer.pending == 40
    tail = framer.flush()
    assert tail is not None and len(tail) == 320 and not tail[40:].any()
    assert np.array_equal(np.concatenate([*frames, tail[:40]]), x)
    assert framer.flush() is None


def test_ring_buffer_keeps_the_latest_samples_by_absolute_index():
    ring = RingBuffer(10)
    ring.write(np.arange(7, dtype=np.float32))
    ring.write(np.arange(7, 15, dtype=np.float32))
    assert ring.total == 15 and ring.oldest == 5
    assert ring.last(4).tolist() == [11, 12, 13, 14]
    assert ring.read(5, 8).tolist() == [5, 6, 7]
    with pytest.raises(IndexError, match="overwritten"):
        ring.read(4, 8)
    with pytest.raises(IndexError, match="outside"):
        ring.read(10, 16)
    ring.write(np.arange(100, 125, dtype=np.float32))  # larger than the capacity
    assert ring.last(10).tolist() == list(range(115, 125))
    assert ring.last(50).tolist() == list(range(115, 125))


def test_wav_round_trip_and_bad_files(tmp_path):
    x = sine(200, 24000, 0.25)
    write_wav(tmp_path / "a.wav", x, 24000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 24000 and np.max(np.abs(y - x)) < 1e-4
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(AudioFormatError, match="not a readable PCM WAV"):
        read_wav(tmp_path / "junk.wav")
