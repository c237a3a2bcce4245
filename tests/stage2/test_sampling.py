"""Sampling: codes only, seeded, KV cache against recomputation, guidance, compiled and Jacobi decoding."""

import pytest
import torch

from stage2_prior.model import (
    TokenLayout,
    grid_to_input_ids,
)
from stage2_prior.sampling import draw, filter_logits, guided_logits, sample_codes

from helpers import LAYOUT, tiny_prior


def test_samples_are_codes_never_special_tokens_and_seeded():
    model = tiny_prior()
    # Make special tokens overwhelmingly likely: sampling must still never return one.
    with torch.no_grad():
        model.lm_head.weight[16:] += 5.0
    for kw in (dict(), dict(top_k=3), dict(top_p=0.5), dict(temperature=0.0), dict(guidance_scale=3.0)):
        g = torch.Generator().manual_seed(1)
        codes = sample_codes(model, 6, classes=[0, 1, 2, 0, 1, 2], generator=g, **kw)
        assert codes.shape == (6, 4, 4) and codes.min() >= 0 and codes.max() < 16, kw
    a = sample_codes(model, 4, classes=[0, 1, 2, 0], generator=torch.Generator().manual_seed(7))
    b = sample_codes(model, 4, classes=[0, 1, 2, 0], generator=torch.Generator().manual_seed(7))
    c = sample_codes(model, 4, classes=[0, 1, 2, 0], generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batches_draw_the_same_samples_as_one_batch_when_greedy_and_the_same_distribution_when_sampled():
    model = tiny_prior()
    classes = [0, 1, 2, 0, 1, 2]
    whole = sample_codes(model, 6, classes=classes, temperature=0.0)
    assert torch.equal(sample_codes(model, 6, classes=classes, temperature=0.0, batch_size=4), whole)
    # Sampled: every batch draws from the same per-row distribution, so the codes' histograms over many
    # images agree between batch 2 and batch 50 (a two-sample chi-square on the first code of each grid).
    g = torch.Generator().manual_seed(0)
    a = sample_codes(model, 1200, classes=[0] * 1200, generator=g, batch_size=50)[:, 0, 0]
    b = sample_codes(model, 1200, classes=[0] * 1200, generator=g, batch_size=600)[:, 0, 0]
    ca, cb = torch.bincount(a, minlength=16).double(), torch.bincount(b, minlength=16).double()
    keep = (ca + cb) > 0
    chi2 = (((ca - cb) ** 2) / (ca + cb))[keep].sum().item()
    assert chi2 < 45.0  # chi-square with <= 15 dof: p < 1e-4 beyond 45


def test_kv_cached_greedy_sampling_equals_full_recomputation():
    model = tiny_prior()
    codes = sample_codes(model, 3, classes=[0, 1, 2], temperature=0.0)
    ids = grid_to_input_ids(torch.zeros(3, 4, 4, dtype=torch.long), LAYOUT, torch.tensor([0, 1, 2]))[:, :2]
    for _ in range(16):  # no cache: recompute the whole prefix for every token
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1, :16].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    assert torch.equal(codes, ids[:, 2:].reshape(-1, 4, 4))


def test_guidance_scale_one_equals_conditional_sampling_and_the_doubled_batch_is_exact():
    model = tiny_prior()
    a = sample_codes(model, 3, classes=[2, 1, 0], guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_codes(model, 3, classes=[2, 1, 0], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    cond = torch.randn(4, 16)
    unc = torch.randn(4, 16)
    assert torch.allclose(guided_logits(cond, unc, 1.0).softmax(-1), cond.softmax(-1), atol=1e-6)
    assert torch.allclose(guided_logits(cond, unc, 0.0).softmax(-1), unc.softmax(-1), atol=1e-6)
    # Guided greedy sampling in one doubled batch equals a reference that runs the two prompts separately.
    g = sample_codes(model, 2, classes=[0, 2], guidance_scale=2.5, temperature=0.0)
    ids_c = grid_to_input_ids(torch.zeros(2, 4, 4, dtype=torch.long), LAYOUT, torch.tensor([0, 2]))[:, :2]
    ids_u = grid_to_input_ids(torch.zeros(2, 4, 4, dtype=torch.long), LAYOUT)[:, :2]
    for _ in range(16):
        lc = model(input_ids=ids_c).logits[:, -1, :16]
        lu = model(input_ids=ids_u).logits[:, -1, :16]
        nxt = guided_logits(lc, lu, 2.5).argmax(-1)[:, None]
        ids_c, ids_u = torch.cat([ids_c, nxt], 1), torch.cat([ids_u, nxt], 1)
    assert torch.equal(g, ids_c[:, 2:].reshape(-1, 4, 4))


@pytest.mark.slow  # subprocesses or a compilation: seconds each
def test_compiled_decoding_draws_the_same_samples_and_leaves_the_model_as_it_was():
    """compile=True (StaticCache, compiled step, eager attention inside) against the eager KV-cached loop."""
    model = tiny_prior()
    classes = [2, 1, 0, 1]
    for kwargs in ({}, {"guidance_scale": 2.0}):
        eager = sample_codes(model, 4, classes=classes, generator=torch.Generator().manual_seed(5), **kwargs)
        for _ in range(2):  # the second call reuses the compiled step and must reset its cache
            compiled = sample_codes(
                model, 4, classes=classes, generator=torch.Generator().manual_seed(5), compile=True, **kwargs
            )
            assert torch.equal(compiled, eager)
    fixed = eager.view(4, -1)[:, :6]  # completion: a longer prompt through the same compiled step
    assert torch.equal(
        sample_codes(model, 4, classes=classes, prefix_codes=fixed, generator=torch.Generator().manual_seed(6)),
        sample_codes(
            model, 4, classes=classes, prefix_codes=fixed, generator=torch.Generator().manual_seed(6), compile=True
        ),
    )
    assert model.config._attn_implementation == "sdpa"  # eager attention only inside the compiled sampling


def test_compiled_decoders_are_kept_per_batch_size_device_and_dtype():
    import gc
    import weakref

    from stage2_prior.sampling import _DECODERS, decoder_for

    model = tiny_prior()
    first = decoder_for(model, 4)  # torch.compile is lazy: nothing is compiled until the step is called
    assert decoder_for(model, 4) is first
    assert decoder_for(model, 8) is not first
    model.double()  # a cast needs a static cache of the new dtype
    assert decoder_for(model, 4) is not first
    assert "_vqgen_compiled_decoders" not in model.__dict__  # kept outside the model
    alive = weakref.ref(model)
    del model, first
    gc.collect()
    assert alive() is None and len(_DECODERS) == 0  # the decoders do not keep the model alive


def test_prefix_codes_are_kept_for_completion():
    model = tiny_prior()
    prefix = torch.randint(0, 16, (1, 8)).expand(3, -1)
    codes = sample_codes(model, 3, prefix_codes=prefix, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes.reshape(3, -1)[:, :8], prefix)


def test_top_p_keeps_the_tokens_transformers_keeps_also_at_exact_ties():
    from transformers.generation.logits_process import TopPLogitsWarper

    # [.5, .25, .25] at top_p=.5: the first token alone reaches the mass, so only it stays (a tie at the edge).
    tie = torch.tensor([[0.5, 0.25, 0.25, 0.0]]).log()
    assert torch.isfinite(filter_logits(tie, None, 0.5)).tolist() == [[True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    for top_p in (0.1, 0.5, 0.75, 0.9, 0.99):
        logits = torch.randn(64, 32, generator=g) * 3
        ours = torch.isfinite(filter_logits(logits, None, top_p))
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(ours, theirs), top_p


def test_inverse_cdf_draw_matches_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(40000, 4)
    tokens = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(freq, probs[0], atol=0.01)


def test_speculative_acceptance_and_residual_reproduce_the_target_distribution():
    from stage2_prior.sampling import residual, speculative_accept

    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.4, 0.2, 0.2])
    # The formulas: P(x) = q(x) min(1, p(x)/q(x)) + P(reject) * residual(x) = p(x), exactly.
    accept = torch.minimum(q, p)
    assert torch.allclose(accept + (1 - accept.sum()) * residual(p, q), p)
    assert torch.allclose(residual(p, q), (p - q).clamp_min(0) / (p - q).clamp_min(0).sum())
    # The acceptance test itself, by Monte Carlo with a fixed seed.
    g = torch.Generator().manual_seed(0)
    n = 200_000
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    ok = speculative_accept(p.expand(n, 5), q.expand(n, 5), drafts, torch.rand(n, generator=g))
    redrawn = torch.multinomial(residual(p, q), n, replacement=True, generator=g)
    final = torch.where(ok, drafts, redrawn)
    freq = torch.bincount(final, minlength=5).double() / n
    assert torch.allclose(freq, p.double(), atol=0.005) and freq[4] == 0


@pytest.mark.parametrize("kwargs", [{}, {"guidance_scale": 2.5}, {"prefix": 5}])
def test_jacobi_decoding_at_temperature_zero_is_greedy_sequential_decoding(kwargs):
    model = tiny_prior()
    classes = [0, 1, 2, 1]
    prefix = kwargs.pop("prefix", None)
    if prefix is not None:
        kwargs["prefix_codes"] = torch.randint(0, 16, (4, prefix), generator=torch.Generator().manual_seed(0))
    seq = sample_codes(model, 4, classes=classes, temperature=0.0, decoding="sequential", **kwargs)
    for batch_size in (4, 1):  # rows masked in one cache; one image whose rejected drafts are cropped
        stats = {}
        jac = sample_codes(
            model, 4, classes=classes, temperature=0.0, decoding="jacobi", window=6, stats=stats,
            batch_size=batch_size, **kwargs,
        )  # fmt: skip
        assert torch.equal(jac, seq) and stats["decoding"] == "jacobi"
        assert stats["forwards"] <= (16 - (prefix or 0)) * (4 // batch_size)  # never more than one per code


def test_jacobi_samples_have_the_marginals_of_sequential_samples():
    """Per-position chi-square between 2000 jacobi and 2000 sequential samples of a tiny prior (fixed seeds)."""
    model = tiny_prior(TokenLayout(codebook_size=16, num_classes=3, height=2, width=3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # a peakier, more structured distribution than the near-uniform init
    n, classes = 2000, [1] * 2000
    settings = dict(guidance_scale=1.5, temperature=0.9, top_k=12)
    seq = sample_codes(model, n, classes=classes, generator=torch.Generator().manual_seed(1), **settings)
    jac = sample_codes(
        model, n, classes=classes, generator=torch.Generator().manual_seed(2), decoding="jacobi", window=4,
        batch_size=100, **settings,
    )  # fmt: skip
    one = sample_codes(  # batch 1: the cropped-cache path
        model, 300, classes=classes[:300], generator=torch.Generator().manual_seed(3), decoding="jacobi", window=4,
        batch_size=1, **settings,
    )  # fmt: skip
    for position in range(6):
        a = torch.bincount(seq.view(n, -1)[:, position], minlength=16).double()
        for other in (jac, one):
            b = torch.bincount(other.view(len(other), -1)[:, position], minlength=16).double()
            ra, rb = (len(other) / n) ** 0.5, (n / len(other)) ** 0.5  # two-sample chi-square, unequal sizes
            keep = (a + b) > 0
            chi2 = (((ra * a - rb * b) ** 2) / (a + b))[keep].sum().item()
            assert chi2 < 45.0, (position, len(other), chi2)  # <= 15 degrees of freedom: p < 1e-4 beyond 45
    # And a pair statistic, so that the joint (not only each marginal) is checked: the last code given the first.
    same = lambda c: (c.view(n, -1)[:, 0] == c.view(n, -1)[:, 5]).double().mean().item()  # noqa: E731
    assert abs(same(seq) - same(jac)) < 4 * (0.25 / n) ** 0.5 * 2**0.5


def test_a_prefix_that_covers_the_whole_grid_is_returned_as_it_is():
    model = tiny_prior()
    full = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    for decoding in ("sequential", "jacobi"):
        out = sample_codes(model, 2, classes=[0, 1], prefix_codes=full, decoding=decoding, batch_size=1)
        assert torch.equal(out.view(2, -1), full), decoding


def test_the_default_decoding_is_jacobi_for_one_image_at_a_time_and_sequential_for_batches():
    model = tiny_prior()
    for batch_size, expected in ((1, "jacobi"), (4, "sequential")):
        stats = {}
        sample_codes(model, 4, classes=[0, 1, 2, 0], batch_size=batch_size, stats=stats)
        assert stats["decoding"] == expected, batch_size
