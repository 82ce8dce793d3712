"""The rollout sampler: exactly softmax(logits / T), vectorised, and each row's draws a function of its seed alone."""

from __future__ import annotations

import math

import pytest
import torch

from prefgym.methods import common

MASK = 0xFFFFFFFF


def fmix32_reference(h: int) -> int:
    """MurmurHash3's fmix32 on Python integers (the published C code, with explicit 32-bit wrap)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK
    return h ^ (h >> 16)


def test_hash_equals_32_bit_reference_arithmetic():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, MASK, 123456789, 0xDEADBEEF, 0x9E3779B9]
    got = common._mix32(torch.tensor(values, dtype=torch.long)).tolist()
    assert got == [fmix32_reference(v) for v in values]
    assert common._mix32(torch.tensor([0])).item() == 0  # fmix32(0) = 0, as published
    x = torch.randint(0, 2**32, (1000,), dtype=torch.long, generator=torch.Generator().manual_seed(0))
    for m in (0x85EBCA6B, 0xC2B2AE35, 3, MASK):
        assert common._mul32(x, m).tolist() == [(v * m) & MASK for v in x.tolist()]


def ks_statistic(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample and Uniform(0, 1)."""
    u, n = u.sort().values.double(), len(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - u).max().item(), (u - (i - 1) / n).max().item())


def test_uniforms_are_uniform_and_uncorrelated_across_seeds_and_steps():
    n = 20000
    seeds = torch.arange(n, dtype=torch.long) * 7919 + 2**40  # high words used too
    across_seeds = common.counter_uniform(seeds, step=3)
    one_seed = common.counter_uniform(torch.full((n,), 12345), step=torch.arange(n))
    next_step = common.counter_uniform(seeds, step=4)
    assert one_seed[7] == common.counter_uniform(torch.tensor([12345]), step=7)[0]  # one step = many steps
    critical = 1.95 / math.sqrt(n)  # KS at p = 0.001
    assert ks_statistic(across_seeds) < critical and ks_statistic(one_seed) < critical
    assert across_seeds.min() >= 0 and across_seeds.max() < 1 and across_seeds.dtype == torch.float64
    for a, b in ((across_seeds, next_step), (across_seeds[:-1], across_seeds[1:]), (one_seed[:-1], one_seed[1:])):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / math.sqrt(n)
    assert len(set(across_seeds.tolist())) == n  # 53 random bits: no repeats among 20000 draws


def test_samples_follow_softmax_over_t_chi_square():
    """20000 rows of the same logits (one seed each) at T = 0.7: counts match softmax(logits / 0.7)
    (chi-square, 4 degrees of freedom, p = 0.001); the -inf token is never drawn."""
    n, T = 20000, 0.7
    logits = torch.tensor([1.0, 0.0, -1.0, 2.5, float("-inf"), 0.3])
    sampler = common.SeededSampler(range(n), T)
    scores = sampler(None, logits.expand(n, -1).clone())
    drawn = scores.argmax(-1)
    assert torch.all(scores.isinf().sum(-1) == 5) and torch.all(scores.max(-1).values == 0)  # one finite score
    counts = torch.bincount(drawn, minlength=6).double()
    assert counts[4] == 0
    keep = torch.tensor([0, 1, 2, 3, 5])
    expect = torch.softmax(logits / T, -1).double()[keep] * n
    chi2 = ((counts[keep] - expect) ** 2 / expect).sum().item()
    assert chi2 < 18.47
    # and at a later step (fresh uniforms), and at T = 1 the distribution is a different one
    later = torch.bincount(sampler(None, logits.expand(n, -1).clone()).argmax(-1), minlength=6).double()
    assert ((later[keep] - expect) ** 2 / expect).sum().item() < 18.47
    at_one = torch.softmax(logits, -1).double()[keep] * n
    assert ((counts[keep] - at_one) ** 2 / at_one).sum().item() > 100


def test_inverse_transform_against_a_loop():
    """The drawn token is the first whose cumulative probability exceeds the row's uniform."""
    torch.manual_seed(0)
    seeds, T = [5, 2**62 + 9, 77, 0], 1.3
    logits = torch.randn(4, 50) * 3
    tokens = common.SeededSampler(seeds, T)(None, logits.clone()).argmax(-1).tolist()
    u = common.counter_uniform(torch.tensor(seeds), step=0).tolist()
    for b in range(4):
        p = [math.exp(x / T) for x in logits[b].tolist()]
        total, acc = sum(p), 0.0
        for j, pj in enumerate(p):
            acc += pj / total
            if acc > u[b]:
                break
        assert tokens[b] == j


def test_rows_do_not_depend_on_the_batch():
    """Each row's tokens over several steps are the same alone or among other rows, in any order."""
    torch.manual_seed(1)
    steps = [torch.randn(3, 1000) for _ in range(4)]
    seeds = [11, 12, 13]
    together = common.SeededSampler(seeds, 0.9)
    reversed_ = common.SeededSampler(seeds[::-1], 0.9)
    alone = [common.SeededSampler([s], 0.9) for s in seeds]
    drawn = []
    for logits in steps:
        a = together(None, logits.clone()).argmax(-1)
        b = reversed_(None, logits.flip(0).clone()).argmax(-1).flip(0)
        c = torch.cat([alone[i](None, logits[i:i + 1].clone()).argmax(-1) for i in range(3)])
        assert a.tolist() == b.tolist() == c.tolist()
        drawn.append(a)
    assert len({tuple(d.tolist()) for d in drawn}) > 1  # the draws move on from step to step


def test_a_seed_gives_the_same_draws_every_time_and_other_seeds_differ():
    logits = torch.zeros(1, 1000)  # uniform: the token is the uniform's bucket
    a = [common.SeededSampler([3], 1.0) for _ in range(2)]
    first = [[s(None, logits.clone()).argmax().item() for _ in range(5)] for s in a]
    other = common.SeededSampler([4], 1.0)
    assert first[0] == first[1]
    assert len(set(first[0])) > 1  # the same logits at the next step: a fresh draw
    # every bit of the seed counts: seeds that differ only in their high word draw differently
    u = common.counter_uniform(torch.tensor([3, 3 + 2**32, 3 + 2**62]), step=0)
    assert len(set(u.tolist())) == 3
    assert first[0] != [other(None, logits.clone()).argmax().item() for _ in range(5)]


def test_precomputed_uniforms_equal_the_step_by_step_draws():
    """The sampler draws the uniforms of its first max_steps steps in one pass: the same values as
    counter_uniform(seed, step) one step at a time, and past max_steps it goes on step by step."""
    import torch

    from prefgym.methods.common import SeededSampler, counter_uniform

    sampler = SeededSampler([3, 2**40 + 7, 12345678901], temperature=1.0, max_steps=4)
    scores = torch.zeros(3, 7)
    for step in range(6):
        expected = counter_uniform(sampler.seeds, step)
        if step < 4:
            assert torch.equal(sampler.uniforms[:, step], expected)
        cdf = torch.arange(1, 8, dtype=torch.float64) / 7
        token = sampler(torch.zeros(3, 1, dtype=torch.long), scores).argmax(-1)
        assert torch.equal(token, torch.searchsorted(cdf.expand(3, -1), (expected * cdf[-1])[:, None], right=True)[:, 0])
