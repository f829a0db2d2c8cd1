"""Streaming audio tokenizer: streamed codes equal offline ``encode``, streamed audio
equals offline ``decode``, on real speech fed in chunks of random length; the
receptive-field helper against perturbations; refusals and input checks."""

from __future__ import annotations

import random

import pytest
import torch

from testdata import shared_path
from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig
from tokenizers_vq.backbones import AudioBackboneConfig, AudioDecoder, AudioEncoder
from tokenizers_vq.media import load_audio
from tokenizers_vq.streaming import LOOKAHEAD_FRAMES, receptive_field

SMALL = {"channels": 8, "strides": [2, 4, 5], "latent_dim": 16, "causal": True, "decoder_dim": 32, "decoder_layers": 2}
HOP = 40


def speech(samples: int) -> torch.Tensor:
    """``(samples,)`` of the first LibriSpeech file at 16 kHz."""
    flac = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    wav, _ = load_audio(flac, sample_rate=16000)
    assert wav.shape[1] >= samples
    return wav[0, :samples]


def small_tokenizer(x: torch.Tensor, levels: int = 1, **config) -> Tokenizer:
    """A causal model whose codebooks are k-means initialised on the latents of ``x`` (no dead-code
    restarts: a restart copies one row, and rows of near-zero residual would leave a second level
    with near-identical codes, between which fp rounding alone decides)."""
    torch.manual_seed(0)
    q = QuantizerConfig("vq", {"codebook_size": 64, "kmeans_init": True, "restart_dead_codes": False}, levels=levels)
    tok = Tokenizer(TokenizerConfig("audio", dict(SMALL), q, **config))
    n = x.shape[0] // HOP * HOP
    with torch.no_grad():
        tok(x[:n].view(1, 1, -1))  # first training pass: k-means on the latents
    return tok.eval()


def random_chunks(n: int, sizes: list[int], rng: random.Random) -> list[slice]:
    out, i = [], 0
    while i < n:
        k = rng.choice(sizes)
        out.append(slice(i, min(n, i + k)))
        i += k
    return out


@pytest.mark.parametrize(("levels", "chunk_frames"), [(1, 500), (2, 500), (1, 40)])
def test_stream_equals_offline_on_speech(levels, chunk_frames):
    """``chunk_frames=40`` makes offline coding run in chunks (context 30 frames >=
    both receptive fields), which a causal model codes exactly as well."""
    n = 6_001  # offline: one window, or 4 chunks of 40 frames when chunk_frames=40
    x = speech(n)
    tok = small_tokenizer(x, levels, chunk_frames=chunk_frames, chunk_context=30)
    codes = tok.encode(x.view(1, 1, -1))[0]
    audio = tok.decode(codes[None], size=(n,))[0]
    assert len(codes.unique()) > 8  # the codes carry information, not one constant
    enc, dec = tok.encode_stream(), tok.decode_stream()
    rng = random.Random(levels + chunk_frames)
    got_codes, got_audio = [], []
    for s in random_chunks(n, [0, 1, 1, 3, 39, 40, 41, 97, 700, 1500], rng):
        c = enc.push(x[s])
        assert enc.frames_out == enc.samples_in // HOP  # a frame is out once its last sample is in
        got_codes.append(c)
        got_audio.append(dec.push(c))
        assert dec.samples_out == max(0, dec.frames_in - LOOKAHEAD_FRAMES) * HOP
    c = enc.flush()
    got_codes.append(c)
    got_audio += [dec.push(c), dec.flush(size=enc.samples_in)]
    streamed = torch.cat(got_codes)
    assert streamed.dtype == torch.long and streamed.shape == codes.shape
    assert torch.equal(streamed, codes)
    streamed_audio = torch.cat(got_audio, dim=1)
    assert streamed_audio.shape == (1, n)
    torch.testing.assert_close(streamed_audio, audio, atol=1e-5, rtol=0)


def test_decode_stream_in_random_code_chunks():
    x = speech(4_000)
    tok = small_tokenizer(x)
    codes = tok.encode(x.view(1, 1, -1))[0]
    dec, rng, parts = tok.decode_stream(), random.Random(1), []
    for s in random_chunks(len(codes), [0, 1, 2, 5, 30], rng):
        parts.append(dec.push(codes[s][None] if rng.random() < 0.5 else codes[s]))
    parts.append(dec.flush())
    torch.testing.assert_close(torch.cat(parts, dim=1), tok.decode(codes[None])[0], atol=1e-5, rtol=0)


def test_receptive_field_matches_perturbations():
    """Changing an input outside the receptive field leaves the output bit-identical;
    the gradient shows that every input inside it counts (a unit change at the far
    end moves the output by ~1e-17 only, below float resolution)."""
    torch.manual_seed(0)
    cfg = AudioBackboneConfig(**SMALL)
    enc, dec = AudioEncoder(cfg).eval(), AudioDecoder(cfg).eval()
    r, t = receptive_field(enc), 40
    assert r == 1034
    x = torch.randn(1, 1, (t + 3) * HOP, requires_grad=True)
    z = enc(x)[..., t]
    (grad,) = torch.autograd.grad(z.square().sum(), x)
    inside = grad[0, 0].ne(0).nonzero()
    assert (inside.min(), inside.max()) == ((t + 1) * HOP - r, (t + 1) * HOP - 1)
    with torch.no_grad():
        y = x.clone()
        y[..., : (t + 1) * HOP - r] += torch.randn((t + 1) * HOP - r)
        y[..., (t + 1) * HOP :] += 1.0
        assert torch.equal(enc(y)[..., t], enc(x)[..., t])  # (inference: the CPU's time-major layout)
    assert torch.equal(enc(y.requires_grad_())[..., t], z)  # (with gradients: the (B, C, T) layout)
    rd = receptive_field(dec)  # in frames: conv_in and two depthwise convs of kernel 7
    assert rd == 19
    zl = torch.randn(1, cfg.latent_dim, t + 3, requires_grad=True)
    f = dec.frame_features(zl)[..., t]
    (grad,) = torch.autograd.grad(f.square().sum(), zl)
    inside = grad[0].abs().sum(0).ne(0).nonzero()
    assert (inside.min(), inside.max()) == (t - rd + 1, t)
    with torch.no_grad():
        zz = zl.clone()
        zz[..., : t - rd + 1] += 1.0
        zz[..., t + 1 :] += 1.0
        assert torch.equal(dec.frame_features(zz)[..., t], f)
    # the default causal config fits in the offline chunk context (25 frames)
    default = AudioBackboneConfig(causal=True)
    assert receptive_field(AudioEncoder(default)) <= TokenizerConfig().chunk_context * default.hop


def test_refuses_models_that_cannot_stream():
    vq = QuantizerConfig("vq", {"codebook_size": 8})
    acausal = Tokenizer(TokenizerConfig("audio", {**SMALL, "causal": False}, vq))
    for make in (acausal.encode_stream, acausal.decode_stream):
        with pytest.raises(ValueError, match=r"model\.backbone\.causal=true"):
            make()
    dyn = QuantizerConfig("vq", {"codebook_size": 8}, dynamic={})
    with pytest.raises(ValueError, match="dynamic-length"):
        Tokenizer(TokenizerConfig("audio", SMALL, dyn)).encode_stream()
    image = Tokenizer(TokenizerConfig("image", {"channels": 8, "channel_mult": [1, 2], "latent_dim": 4}))
    with pytest.raises(ValueError, match="audio"):
        image.decode_stream()


def test_chunk_layouts_empty_streams_and_misuse():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig("audio", SMALL, QuantizerConfig("vq", {"codebook_size": 8}))).eval()
    x = torch.randn(130)
    results = []
    for layout in (lambda c: c, lambda c: c[None], lambda c: c[None, None]):
        enc = tok.encode_stream()
        parts = [enc.push(layout(x[:50])), enc.push(layout(x[50:50])), enc.push(layout(x[50:])), enc.flush()]
        results.append(torch.cat(parts))
        with pytest.raises(ValueError, match="after flush"):
            enc.push(x)
    assert all(torch.equal(r, results[0]) for r in results) and results[0].shape == (4,)
    enc = tok.encode_stream()
    for bad, words in ((torch.randn(2, 10), "mono samples"), (torch.arange(5), "floating-point"),
                       (torch.tensor([0.0, float("nan")]), "NaN or Inf"), (torch.tensor([0.0, 2000.0]), "x / 32768")):
        with pytest.raises(ValueError, match=words):
            enc.push(bad)
    assert enc.flush().shape == (0,)
    dec = tok.decode_stream()
    assert dec.push(torch.zeros(0, dtype=torch.long)).shape == (1, 0)
    for bad in (torch.zeros(3), torch.full((3,), 8), torch.zeros(2, 3, dtype=torch.long)):
        with pytest.raises(ValueError):
            dec.push(bad)
    assert dec.flush().shape == (1, 0)
    dec = tok.decode_stream()
    assert dec.push(results[0]).shape == (1, 2 * HOP)
    with pytest.raises(ValueError, match="already returned"):
        dec.flush(size=HOP)
    # codes of any integer dtype, as an export's shards hold them (uint16), give the same audio
    wide, narrow = tok.decode_stream(), tok.decode_stream()
    assert torch.equal(wide.push(results[0]), narrow.push(results[0].to(torch.uint16)))
    with pytest.raises(ValueError, match=r"got a NumPy array of float32 \(torch.from_numpy\(x\).float\(\)"):
        tok.encode_stream().push(x.numpy())
    with pytest.raises(ValueError, match=r"got a NumPy array of float32 \(torch.from_numpy"):
        tok.encode(x.numpy()[None, None])


def test_state_stays_bounded_on_a_long_stream():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig("audio", SMALL, QuantizerConfig("vq", {"codebook_size": 8}))).eval()
    enc, dec = tok.encode_stream(), tok.decode_stream()
    for _ in range(20):
        dec.push(enc.push(torch.randn(333)))
        assert enc._buf.numel() < HOP  # the part of a frame not yet complete
        assert dec._tail.numel() == 3 * HOP  # the iSTFT's overlap: the state is the conv carries and this
    assert enc.samples_in == 20 * 333 and dec.samples_out == (enc.frames_out - LOOKAHEAD_FRAMES) * HOP


def test_the_shipped_speech_default_streams_as_it_codes_offline():
    """The embedded ``speech`` model is causal: its offline chunk context covers both
    receptive fields, so a long real recording (several offline chunks) streamed in
    chunks of random length gives the offline codes and audio."""
    tok = Tokenizer.from_pretrained("speech").eval()
    hop, ctx = tok.backbone_config.hop, tok.config.chunk_context
    assert tok.backbone_config.causal
    assert receptive_field(tok.encoder) <= ctx * hop and receptive_field(tok.decoder) <= ctx
    flacs = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[:4]
    x = torch.cat([load_audio(f, sample_rate=16000)[0][0] for f in flacs])  # four speakers in a row
    n = min(x.shape[0], (tok.config.chunk_frames * 2 + 3 * ctx) * hop + 77)
    assert n > (tok.config.chunk_frames + 2 * ctx) * hop  # offline coding runs in chunks
    x = x[:n]
    codes = tok.encode(x.view(1, 1, -1))[0]
    audio = tok.decode(codes[None], size=(n,))[0]
    enc, dec = tok.encode_stream(), tok.decode_stream()
    rng, got_codes, got_audio = random.Random(5), [], []
    for s in random_chunks(n, [160, 240, 1000, 4801, 16000], rng):
        c = enc.push(x[s])
        got_codes.append(c)
        got_audio.append(dec.push(c))
    c = enc.flush()
    got_codes.append(c)
    got_audio += [dec.push(c), dec.flush(size=enc.samples_in)]
    assert torch.equal(torch.cat(got_codes), codes)
    torch.testing.assert_close(torch.cat(got_audio, dim=1), audio, atol=1e-4, rtol=0)


def test_a_causal_model_raises_its_chunk_context_to_its_receptive_fields():
    """A causal config whose chunk context is too short for its receptive fields gets the
    context that makes offline chunks exact; an offline model keeps what it was given."""
    q = QuantizerConfig("vq", {"codebook_size": 8})
    short = Tokenizer(TokenizerConfig("audio", dict(SMALL), q, chunk_context=2))
    needed = max(-(-receptive_field(short.encoder) // HOP), receptive_field(short.decoder))
    assert short.config.chunk_context == needed > 2
    assert Tokenizer(TokenizerConfig("audio", {**SMALL, "causal": False}, q, chunk_context=2)).config.chunk_context == 2


def test_one_long_push_runs_in_bounded_chunks_and_equals_offline():
    """A whole recording pushed at once is coded ``chunk_frames`` frames at a time (each
    frame computed once, from the layers' carried inputs), not in one pass the length of
    the input."""
    n = 12_000  # 300 frames of 40 samples
    x = speech(n)
    tok = small_tokenizer(x, chunk_frames=40, chunk_context=30)
    codes = tok.encode(x.view(1, 1, -1))[0]
    audio = tok.decode(codes[None], size=(n,))[0]
    seen = {"enc": [], "dec": []}
    tok.encoder.register_forward_pre_hook(lambda m, a: seen["enc"].append(a[0].shape[-1]))
    tok.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen["dec"].append(a[0].shape[-1]))
    enc, dec = tok.encode_stream(), tok.decode_stream()
    got = torch.cat([enc.push(x), enc.flush()])
    wav = torch.cat([dec.push(got), dec.flush(size=n)], dim=1)
    assert torch.equal(got, codes)
    torch.testing.assert_close(wav, audio, atol=1e-5, rtol=0)
    assert seen["enc"] == [40 * HOP] * 7 + [20 * HOP]  # 300 frames: 7 chunks of 40, then 20
    assert seen["dec"] == [40] * 7 + [20]


def test_a_bad_flush_size_is_refused_and_the_stream_keeps_its_audio():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig("audio", SMALL, QuantizerConfig("vq", {"codebook_size": 8}))).eval()
    dec = tok.decode_stream()
    assert dec.push(torch.arange(3)).shape == (1, HOP)  # frame 0 is final; 1 and 2 wait for the lookahead
    for bad in (600.5, "600", True):
        with pytest.raises(ValueError, match="whole number"):
            dec.flush(size=bad)
    for lost in (2 * HOP, 3 * HOP + 1):  # ends before the last frame received (frames lost), or past it
        with pytest.raises(ValueError, match="last of the 3 frames"):
            dec.flush(size=lost)
    assert dec.flush(size=100).shape == (1, 100 - HOP)  # still open: the held-back samples come out


def test_frames_first_blocks_are_named_with_the_mix_that_keeps_their_samples():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig("audio", SMALL, QuantizerConfig("vq", {"codebook_size": 8}))).eval()
    enc = tok.encode_stream()
    with pytest.raises(ValueError, match=r"chunk.mean\(-1\): it is \(frames, channels\)"):
        enc.push(torch.randn(480, 2) * 0.1)  # as sounddevice and PyAudio deliver a block
    with pytest.raises(ValueError, match=r"chunk.mean\(0\) for \(channels, n\)"):
        enc.push(torch.randn(2, 480) * 0.1)
    assert enc.samples_in == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_stream_equals_offline():
    """On a GPU (the conv carries in the (B, C, T) layout, the iSTFT tail on the device): streamed
    codes equal offline, streamed audio equals offline to float rounding."""
    n = 6_001
    x = speech(n)
    tok = small_tokenizer(x).cuda()
    codes = tok.encode(x.view(1, 1, -1).cuda())[0]
    audio = tok.decode(codes[None], size=(n,))[0]
    enc, dec = tok.encode_stream(), tok.decode_stream()
    got_codes, got_audio = [], []
    for s in random_chunks(n, [1, 39, 40, 97, 700], random.Random(3)):
        got_codes.append(enc.push(x[s].cuda()))
        got_audio.append(dec.push(got_codes[-1]))
    got_codes.append(enc.flush())
    got_audio += [dec.push(got_codes[-1]), dec.flush(size=n)]
    assert torch.equal(torch.cat(got_codes), codes)
    torch.testing.assert_close(torch.cat(got_audio, dim=1), audio, atol=1e-4, rtol=0)


def test_streams_in_threads_and_an_offline_encode_beside_them_keep_apart():
    """A stream's carried inputs are its own thread's: two streams of one tokenizer in two
    threads, and offline encodes in a third, give the offline ids (state kept on the shared
    layers would let a thread switch mid-push hand one stream the other's samples)."""
    import sys  # noqa: PLC0415
    import threading  # noqa: PLC0415

    x = speech(16_000)
    tok = small_tokenizer(x)
    waves = [x[:8_000], x[8_000:]]
    offline = [tok.encode(w.view(1, 1, -1))[0] for w in waves]
    got, errors, stop = {}, [], threading.Event()

    def stream(k):
        enc = tok.encode_stream()
        got[k] = torch.cat([enc.push(waves[k][i : i + 80]) for i in range(0, 8_000, 80)] + [enc.flush()])

    def offline_loop():
        while not stop.is_set():
            if not torch.equal(tok.encode(waves[0].view(1, 1, -1))[0], offline[0]):
                errors.append("an offline encode beside the streams differed")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        side = threading.Thread(target=offline_loop)
        side.start()
        streams = [threading.Thread(target=stream, args=(k,)) for k in (0, 1)]
        for t in streams:
            t.start()
        for t in streams:
            t.join()
        stop.set()
        side.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:1]
    for k in (0, 1):
        assert torch.equal(got[k], offline[k]), f"stream {k}: {(got[k] != offline[k]).sum()} ids differ"


def test_a_compiled_model_is_refused_by_streams():
    """A compiled graph does not carry a stream's samples from push to push (87 of 100 ids
    differ when a stream runs one): the stream refuses it, when it starts and when the model is compiled later."""
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig("audio", SMALL, QuantizerConfig("vq", {"codebook_size": 8}))).eval()
    enc = tok.encode_stream()
    tok.encoder.compile()  # (compiles lazily: the refusals come before any call)
    with pytest.raises(ValueError, match="compiled"):
        enc.push(torch.zeros(400))
    with pytest.raises(ValueError, match="compiled"):
        tok.encode_stream()
    tok.encoder = tok.encoder._orig_mod if hasattr(tok.encoder, "_orig_mod") else tok.encoder
    tok.decoder = torch.compile(tok.decoder)
    with pytest.raises(ValueError, match="compiled"):
        tok.decode_stream()


def test_a_push_that_fails_part_way_leaves_the_stream_as_it_was(monkeypatch):
    x = speech(4_000)
    tok = small_tokenizer(x, chunk_frames=10, chunk_context=30)
    offline = tok.encode(x.view(1, 1, -1))[0]
    enc = tok.encode_stream()
    first = enc.push(x[:1_000])
    real, calls = tok.quantizer.encode, []

    def second_chunk_fails(z, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("latent out of range")
        return real(z, *a, **k)

    monkeypatch.setattr(tok.quantizer, "encode", second_chunk_fails)
    with pytest.raises(ValueError, match="out of range"):
        enc.push(x[1_000:3_000])  # 50 frames: 5 chunks of 10
    assert enc.samples_in == 1_000 and enc.frames_out == first.shape[0]
    monkeypatch.setattr(tok.quantizer, "encode", real)
    rest = [enc.push(x[1_000:3_000]), enc.push(x[3_000:]), enc.flush()]
    assert torch.equal(torch.cat([first, *rest]), offline)
