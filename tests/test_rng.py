"""The noise of a seed as AUTOMATIC1111 draws it, computed independently here and compared with backend.engine.rng:
torch's CPU generator for the "GPU" (on a CPU-only machine) and "CPU" sources, the Philox 4x32-10 / Box-Muller
emulation of CUDA's generator for "NV", ENSD's reseeding of the sampler noise, variation seeds and resized seeds."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from backend.engine.rng import ImageRNG, PhiloxGenerator, philox4x32, slerp

SHAPE = (4, 6, 5)
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox_scalar(counter, key):
    """Philox4x32-10 written from the paper, one block of four 32-bit words at a time."""
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + W0) & 0xFFFFFFFF, (k[1] + W1) & 0xFFFFFFFF]
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
    return c


def f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def nv_reference(seed: int, offset: int, n: int) -> np.ndarray:
    """A1111's NV normals: number i of the draw at `offset` is Box-Muller's first normal of the first two words of
    Philox(counter=(offset, 0, i, 0), key=seed), with u and v centred in their 2^-32 cells (float32 constants)."""
    c1, c2 = f32(2.3283064e-10), f32(2.3283064e-10 * 6.2831855)
    u, v = [], []
    for i in range(n):
        x, y, _, _ = philox_scalar((offset, 0, i, 0), (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
        u.append(x * c1 + c1 / 2)
        v.append(y * c2 + c2 / 2)
    u, v = np.array(u, dtype=np.float64), np.array(v, dtype=np.float64)
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    """Random123's known-answer vectors for Philox4x32-10."""
    got = philox4x32(np.array(counter, dtype=np.uint32).reshape(4, 1), key)[:, 0]
    assert tuple(int(w) for w in got) == expected
    assert tuple(philox_scalar(counter, key)) == expected


def test_philox_matches_the_scalar_cipher_on_many_counters():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2 ** 32, size=(4, 64), dtype=np.uint64).astype(np.uint32)
    key = (0x12345678, 0x9ABCDEF0)
    got = philox4x32(counters, key)
    for i in range(64):
        assert [int(w) for w in got[:, i]] == philox_scalar([int(c) for c in counters[:, i]], key)


def test_nv_matches_the_published_output_of_seed_0():
    """A1111's rng_philox documents Generator(seed=0).randn((3, 4)) (8 decimals; torch.randn on CUDA gives it too)."""
    published = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                          [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                          [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    got = PhiloxGenerator(0).randn((3, 4))
    assert got.dtype == np.float32 and got.shape == (3, 4)
    assert np.abs(got - published).max() < 1e-6


@pytest.mark.parametrize("seed", [0, 31337, 4294967294, 2 ** 32 + 5])
def test_nv_is_bit_exact_with_the_reference_draw_after_draw(seed):
    gen = PhiloxGenerator(seed)
    n = int(np.prod(SHAPE))
    for offset in range(3):  # each call is the next offset
        got = gen.randn(SHAPE)
        assert np.array_equal(got.reshape(-1).view(np.uint32), nv_reference(seed, offset, n).view(np.uint32))


def cpu_draws(seed: int, count: int, shape=SHAPE) -> list[torch.Tensor]:
    gen = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("source", ["GPU", "CPU"])
def test_gpu_on_a_cpu_machine_and_cpu_are_torchs_cpu_generator(source):
    rng = ImageRNG(SHAPE, [5, 6], source=source, device="cpu")
    first, second, third = rng.first(), rng.next(), rng.next()
    for i, seed in enumerate([5, 6]):
        expected = cpu_draws(seed, 3)
        assert torch.equal(first[i], expected[0])
        assert torch.equal(second[i], expected[1]) and torch.equal(third[i], expected[2])


def test_cpu_source_ignores_the_device_and_gpu_source_follows_it():
    from backend.engine.rng import generator_device
    assert generator_device("CPU", "cuda:0").type == "cpu"
    assert generator_device("GPU", "cuda:0") == torch.device("cuda:0")
    assert generator_device("GPU", "mps").type == "cpu"  # A1111 draws on the CPU for Apple's MPS
    assert generator_device("GPU", "cpu").type == "cpu"


def test_nv_source_draws_philox_per_image():
    n = int(np.prod(SHAPE))
    rng = ImageRNG(SHAPE, [7, 8], source="NV")
    first, second = rng.first(), rng.next()
    for i, seed in enumerate([7, 8]):
        assert np.array_equal(first[i].numpy().reshape(-1), nv_reference(seed, 0, n))
        assert np.array_equal(second[i].numpy().reshape(-1), nv_reference(seed, 1, n))
    assert not torch.equal(first, ImageRNG(SHAPE, [7, 8], source="CPU").first())


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_ensd_reseeds_only_the_sampler_noise(source):
    plain, delta = ImageRNG(SHAPE, [100], source=source), ImageRNG(SHAPE, [100], source=source, ensd=31337)
    assert torch.equal(plain.first(), delta.first())  # the initial noise is the seed's
    after = delta.next()
    if source == "CPU":
        assert torch.equal(after[0], cpu_draws(100 + 31337, 1)[0])
    else:
        assert np.array_equal(after[0].numpy().reshape(-1), nv_reference(100 + 31337, 0, int(np.prod(SHAPE))))
    assert not torch.equal(after, plain.next())


def a1111_slerp(val, low, high):
    """AUTOMATIC1111's slerp as it is applied to one image's [C, H, W] noises (norms along dim 1)."""
    low_n = low / low.norm(dim=1, keepdim=True)
    high_n = high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((low_n * high_n).sum(1))
    so = torch.sin(omega)
    return (torch.sin((1 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def test_variation_seed_blends_like_a1111():
    rng = ImageRNG(SHAPE, [10, 11], [99, 100], subseed_strength=0.3, source="CPU")
    got = rng.first()
    for i, (seed, subseed) in enumerate([(10, 99), (11, 100)]):
        expected = a1111_slerp(0.3, cpu_draws(seed, 1)[0], cpu_draws(subseed, 1)[0])
        assert torch.allclose(got[i], expected, atol=1e-6)
    flat = slerp(0.3, cpu_draws(10, 1)[0].reshape(1, -1), cpu_draws(99, 1)[0].reshape(1, -1)).reshape(SHAPE)
    assert not torch.allclose(got[0], flat, atol=1e-4)  # per column, not over the whole latent
    # the sampler noise continues the seed's own generator (the variation noise comes from a fresh one)
    assert torch.equal(rng.next()[0], cpu_draws(10, 2)[1])


def test_resized_seed_pastes_the_small_noise_and_advances_the_generator():
    rng = ImageRNG((4, 8, 8), [10], seed_resize_from_h=32, seed_resize_from_w=32, source="CPU")
    got = rng.first()[0]
    small = cpu_draws(10, 1, (4, 4, 4))[0]
    full = cpu_draws(10, 2, (4, 8, 8))
    assert torch.equal(got[:, 2:6, 2:6], small)
    assert torch.equal(got[:, :2], full[0][:, :2])  # around it: the full-size noise of the image's generator
    assert torch.equal(rng.next()[0], full[1])  # which moved on by that draw, as A1111's


def test_sde_noise_is_a1111s_brownian_tree_per_image_seed():
    """DPM++ SDE's noise: k-diffusion's BrownianTreeNoiseSampler with the batch's seeds, as A1111 creates it."""
    from backend.engine.rng import BrownianNoise
    from tests.test_samplers_vs_kdiffusion import K
    like = torch.zeros(2, *SHAPE)
    sigmas = torch.tensor([14.6, 7.0, 2.5, 0.7, 0.03, 0.0])
    ours = BrownianNoise(like, sigmas, [31, 32])
    theirs = K.BrownianTreeNoiseSampler(like, sigmas[sigmas > 0].min(), sigmas.max(), seed=[31, 32])
    for s, sn in [(14.6, 7.0), (7.0, 2.5), (7.0, 4.2), (0.7, 0.03)]:
        s, sn = torch.tensor(s), torch.tensor(sn)  # float32, as the schedule's sigmas
        got = ours(float(s), float(sn))
        assert torch.equal(got, theirs(s, sn))
        assert got.shape == like.shape
    single = BrownianNoise(like[:1], sigmas, [32])  # image 2 of the batch is its seed alone
    assert torch.equal(single(7.0, 2.5)[0], ours(7.0, 2.5)[1])
    assert not torch.equal(ours(7.0, 2.5)[0], ours(7.0, 2.5)[1])
    top = BrownianNoise(like, sigmas[2:], [31, 32], sigma_max=float(sigmas[0]))  # a cut of the schedule spans the whole
    assert torch.equal(top(2.5, 0.7), ours(2.5, 0.7))


def test_a_huge_ensd_wraps_to_64_bits_instead_of_failing():
    for source in ("CPU", "NV"):
        huge, small = (ImageRNG(SHAPE, [3], source=source, ensd=ensd) for ensd in (2 ** 64 + 10, 10))
        huge.first(), small.first()
        assert torch.equal(huge.next(), small.next())
