"""The espeak-ng ctypes binding: shipped voices, reproducible samples, rate, errors."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from ebranchformer.asr import espeak
from ebranchformer.asr.espeak import SAMPLE_RATE, EspeakError, SpeechRequest, synthesize, synthesize_batch


def test_shipped_data_has_english_voices_and_variants():
    languages, variants = espeak.list_languages(), espeak.list_variants()
    assert {"en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029"} <= set(languages)
    assert {f"m{i}" for i in range(1, 9)} | {f"f{i}" for i in range(1, 6)} | {"klatt"} <= set(variants)


def test_speech_is_loud_and_as_long_as_the_words():
    pcm = synthesize("seven red cats jump over the fence", voice="en-us", variant="m3", rate=175)
    assert pcm.dtype == np.int16
    seconds = pcm.size / SAMPLE_RATE
    assert 1.2 < seconds < 4.0  # 7 words at 175 wpm: 2.4 s
    assert np.abs(pcm).max() > 5000


def test_faster_rate_gives_shorter_audio():
    slow = synthesize("one two three four five six", rate=120)
    fast = synthesize("one two three four five six", rate=300)
    assert fast.size < 0.6 * slow.size


def test_same_request_gives_same_samples_whatever_was_spoken_before():
    first = synthesize("the big dog runs", variant="f2", seed=5)
    synthesize("a very different sentence with many words in it", voice="en-gb-x-rp", variant="klatt")
    again = synthesize("the big dog runs", variant="f2", seed=5)
    np.testing.assert_array_equal(first, again)
    other = synthesize("the big dog runs", variant="m1", seed=5)
    assert other.size != first.size or not np.array_equal(other, first)


def test_batch_is_reproducible_and_matches_in_a_fresh_process():
    requests = [SpeechRequest("green apple", variant="m2", seed=1),
                SpeechRequest("nine birds", voice="en", seed=2)]
    batch = synthesize_batch(requests)
    assert [a.tobytes() for a in synthesize_batch(requests)] == [a.tobytes() for a in batch]
    code = ("import sys; from ebranchformer.asr.espeak import synthesize; "
            "sys.stdout.buffer.write(synthesize('green apple', variant='m2', seed=1).tobytes())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60).stdout
    assert fresh == batch[0].tobytes()


@pytest.mark.parametrize("kwargs, error", [
    ({"text": ""}, ValueError),
    ({"text": "hi", "voice": "en+m1"}, ValueError),
    ({"text": "hi", "rate": 10}, ValueError),
    ({"text": "hi", "pitch": 101}, ValueError),
    ({"text": "hi", "pitch_range": "50"}, TypeError),
    ({"text": "hi", "seed": -1}, ValueError),
])
def test_bad_requests_raise(kwargs, error):
    with pytest.raises(error):
        SpeechRequest(**kwargs)


def test_unknown_voices_raise():
    with pytest.raises(EspeakError, match="voice 'xx-nowhere'"):
        synthesize("hello", voice="xx-nowhere")
    with pytest.raises(EspeakError, match="variant 'nobody'"):
        synthesize("hello", variant="nobody")
    with pytest.raises(TypeError):
        synthesize_batch(["hello"])
