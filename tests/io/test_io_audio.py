from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly

from mmcompose.errors import InputError
from mmcompose.io import fit_length, load_audio
from mmcompose.io.audio import resample
from tests.io.media import sine, wav_header


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[spectrum.argmax()])


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext", "tolerance"),
    [
        ("WAV", "PCM_16", "wav", 1e-3),
        ("WAV", "FLOAT", "wav", 1e-5),
        ("FLAC", "PCM_24", "flac", 1e-4),
        ("OGG", "VORBIS", "ogg", 0.02),
        ("MP3", "MPEG_LAYER_III", "mp3", 0.02),
    ],
)
def test_stereo_44k_file_becomes_16k_mono(tmp_path: Path, fmt: str, subtype: str, ext: str, tolerance: float) -> None:
    left, right = sine(440, 44100, 1.0, 0.6), sine(440, 44100, 1.0, 0.2)
    path = tmp_path / f"tone.{ext}"
    sf.write(path, np.stack([left, right], axis=1), 44100, format=fmt, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape == (16000,)
    assert abs(peak_hz(wave, 16000) - 440) <= 1.0
    middle = wave[2000:-2000]  # codecs add priming delay at the edges
    assert abs(rms(middle) - 0.4 / np.sqrt(2)) < tolerance  # channel mean, not sum
    if ext in ("wav", "flac"):  # lossless and sample-aligned: compare with the ideal 16 kHz sine
        ideal = sine(440, 16000, 1.0, 0.4)
        assert np.abs(wave[200:-200] - ideal[200:-200]).max() < 2 * tolerance + 1e-4


@pytest.mark.parametrize(("orig", "target"), [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000)])
def test_resample_preserves_a_sine(orig: int, target: int) -> None:
    wave = sine(440, orig, 1.0)
    out = resample(wave, orig, target)
    assert out.shape == (-(-wave.size * target // orig),) and out.dtype == np.float32
    assert abs(peak_hz(out, target) - 440) <= 1.0
    ideal = sine(440, target, 1.0)
    assert np.abs(out[300:-300] - ideal[300:-300]).max() < 1e-4


@pytest.mark.parametrize("freq", [8000, 8500, 12000, 20000])
def test_resample_does_not_alias(freq: int) -> None:
    out = resample(sine(freq, 44100, 1.0, 1.0), 44100, 16000)
    assert rms(out[300:-300]) < 1e-3  # >= 60 dB down; a naive decimator would fold these into 0..8 kHz


def test_resample_passband_is_flat() -> None:
    for freq in (100, 3000, 6000):
        out = resample(sine(freq, 44100, 1.0, 1.0), 44100, 16000)
        assert abs(rms(out[300:-300]) - 1 / np.sqrt(2)) < 1e-3


def test_resample_odd_rates_and_identity() -> None:
    wave = sine(440, 44099, 0.2)  # coprime with 16000: 16000 distinct filter phases
    out = resample(wave, 44099, 16000)
    assert out.size == -(-wave.size * 16000 // 44099)
    ideal = 0.5 * np.sin(2 * np.pi * 440 * np.arange(out.size) / 16000)
    assert np.abs(out[300:-300] - ideal[300:-300]).max() < 1e-4
    assert np.array_equal(resample(wave, 16000, 16000), wave)


def test_resample_length_is_the_ceiling_even_for_tiny_inputs() -> None:
    rng = np.random.default_rng(0)
    for orig, target in ((44100, 16000), (44099, 16000), (8000, 16000), (48000, 16000)):
        for size in (*range(1, 40), 8819, 44101):
            out = resample(rng.standard_normal(size).astype(np.float32), orig, target)
            assert out.size == -(-size * target // orig), (orig, target, size)


def test_resample_matches_scipy_resample_poly() -> None:
    # 20 tones in the passband (50 Hz .. 6 kHz), 44.1 -> 16 kHz: scipy's polyphase Kaiser filter is the reference;
    # both must also match the same tones sampled directly at 16 kHz (scipy's own error there is ~4e-4).
    rng = np.random.default_rng(1)
    freqs, phases = rng.uniform(50, 6000, 20), rng.uniform(0, 2 * np.pi, 20)

    def tones(rate: int) -> np.ndarray:
        t = np.arange(rate) / rate
        return (np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None]).sum(0) / 20).astype(np.float32)

    ours, reference = resample(tones(44100), 44100, 16000), resample_poly(tones(44100), 160, 441)
    assert ours.shape == reference.shape == (16000,)
    assert np.abs(ours - reference)[300:-300].max() < 1e-3
    assert np.abs(ours - tones(16000))[300:-300].max() < 1e-4


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_speech(tmp_path: Path) -> None:
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "the quick brown fox"], check=True, capture_output=True)
    native_rate = sf.info(path).samplerate
    wave = load_audio(path)
    assert abs(wave.size - sf.info(path).frames * 16000 / native_rate) <= 1
    assert wave.size > 16000 * 0.5 and rms(wave) > 0.01
    spectrum = np.abs(np.fft.rfft(wave)) ** 2
    assert spectrum[: spectrum.size // 2].sum() > 0.9 * spectrum.sum()  # speech energy is below 4 kHz


def test_array_inputs() -> None:
    stereo = np.stack([sine(440, 44100, 0.5), sine(440, 44100, 0.5)], axis=1)
    assert load_audio((stereo, 44100)).shape == (8000,)
    assert load_audio(sine(440, 16000, 0.5)).shape == (8000,)
    pcm = (sine(440, 16000, 0.5) * 32767).astype(np.int16)
    assert abs(rms(load_audio(pcm)) - 0.5 / np.sqrt(2)) < 1e-3


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (np.zeros((2, 16000), np.float32), "transpose"),
        (np.zeros((4, 4, 4), np.float32), "expected an audio array"),
        (np.array([0.0, np.nan], np.float32), "NaN or infinite"),
        (np.array([0.0, np.inf]), "NaN or infinite"),
        (np.zeros(0, np.float32), "no audio samples"),
        (np.zeros(10, np.complex64), "dtype complex64"),
        ((np.zeros(10), 0), "sample rate must be"),
        ((np.zeros(10),), "pair"),
    ],
)
def test_bad_arrays(source: object, message: str) -> None:
    with pytest.raises(InputError, match="audio") as info:
        load_audio(source)
    assert message in str(info.value)


def test_nan_in_float_wav(tmp_path: Path) -> None:
    wave = sine(440, 16000, 0.1)
    wave[100] = np.nan
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match=r"nan\.wav: audio contains NaN or infinite samples"):
        load_audio(tmp_path / "nan.wav")


def test_two_hour_file_is_refused_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = 2 * 3600 * 16000
    sparse = tmp_path / "long.wav"
    with open(sparse, "wb") as handle:  # a real 2-hour file, but sparse on disk
        handle.write(wav_header(frames))
        handle.truncate(44 + 2 * frames)
    lying = tmp_path / "lying.wav"
    lying.write_bytes(wav_header(frames) + b"\0" * 1000)
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the samples were decoded: the header alone must refuse this file")

    for path in (sparse, lying):
        with monkeypatch.context() as patch:
            patch.setattr(sf.SoundFile, "read", no_decoding)
            patch.setattr(sf, "read", no_decoding)
            with pytest.raises(InputError, match=r"header declares 7200\.0 s of audio, above max_seconds=600"):
                load_audio(path)


def test_flac_header_claiming_two_hours(tmp_path: Path) -> None:
    path = tmp_path / "short.flac"
    sf.write(path, sine(440, 44100, 0.1), 44100, format="FLAC")
    data = bytearray(path.read_bytes())
    # STREAMINFO starts at byte 8; its bytes 10..17 end with the 36-bit total sample count.
    field = int.from_bytes(data[18:26], "big")
    data[18:26] = ((field & ~((1 << 36) - 1)) | (2 * 3600 * 44100)).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"short\.flac: header declares 7200\.0 s"):
        load_audio(path)


def test_max_seconds_is_enforced(tmp_path: Path) -> None:
    sf.write(tmp_path / "two.wav", sine(440, 8000, 2.0), 8000)
    with pytest.raises(InputError, match=r"2\.0 s of audio, above max_seconds=1"):
        load_audio(tmp_path / "two.wav", max_seconds=1.0)
    with pytest.raises(InputError, match="above max_seconds=1"):
        load_audio(sine(440, 16000, 2.0), max_seconds=1.0)


def test_truncated_files(tmp_path: Path) -> None:
    for ext in ("wav", "flac"):
        sf.write(tmp_path / f"full.{ext}", sine(440, 16000, 1.0), 16000)
        data = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.wav: truncated audio data \(header declares 16000 frames"):
        load_audio(tmp_path / "cut.wav")
    with pytest.raises(InputError, match=r"cut\.flac: cannot decode audio, corrupt or truncated"):
        load_audio(tmp_path / "cut.flac")


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.wav", format="PNG")  # mislabelled
    (tmp_path / "noise.flac").write_bytes(np.random.default_rng(1).integers(0, 256, 700, np.uint8).tobytes())
    sf.write(tmp_path / "tone.aiff", sine(440, 8000, 0.1), 8000, format="AIFF")
    (tmp_path / "silent.wav").write_bytes(wav_header(0))
    cases = {
        tmp_path / "empty.wav": "empty file",
        tmp_path / "missing.wav": "no such file",
        tmp_path: "is a directory",
        tmp_path / "picture.wav": "not a readable audio file",
        tmp_path / "noise.flac": "not a readable audio file",
        tmp_path / "tone.aiff": "unsupported audio format AIFF",
        tmp_path / "silent.wav": "contains no audio samples",
    }
    for path, message in cases.items():
        with pytest.raises(InputError) as info:
            load_audio(path)
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_fit_length_policies() -> None:
    wave = np.arange(1, 6, dtype=np.float32)
    assert fit_length(wave, 7, "pad").tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert fit_length(wave, 3, "trim").tolist() == [1, 2, 3]
    assert fit_length(wave, 3, "pad_or_trim").tolist() == [1, 2, 3]
    assert fit_length(wave, 6, "pad_or_trim").tolist() == [1, 2, 3, 4, 5, 0]
    assert fit_length(wave, 5, "pad").tolist() == wave.tolist()
    chunks = fit_length(wave, 2, "chunk")
    assert chunks.shape == (3, 2) and chunks.dtype == np.float32
    assert chunks.tolist() == [[1, 2], [3, 4], [5, 0]]
    assert fit_length(wave, 5, "chunk").shape == (1, 5)
    with pytest.raises(InputError, match="policy 'pad' never trims"):
        fit_length(wave, 3, "pad")
    with pytest.raises(InputError, match="policy 'trim' never pads"):
        fit_length(wave, 9, "trim")
    with pytest.raises(InputError, match="empty waveform"):
        fit_length(np.zeros(0), 4, "chunk")
    with pytest.raises(ValueError, match="unknown length policy"):
        fit_length(wave, 4, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        fit_length(np.zeros((2, 2)), 4, "pad")
