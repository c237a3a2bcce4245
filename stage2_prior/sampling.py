"""Sampling code grids from a prior: the KV-cached loop, classifier-free guidance, completion, compiled decoding.

    codes = sample_codes(prior, 16, classes=torch.arange(16) % 10, guidance_scale=2.0, temperature=0.9)

Guidance runs the conditional and NULL prompts as one doubled batch through one KV cache and mixes the two
log-distributions as log p_u + s (log p_c - log p_u). Only code tokens are ever drawn. `compile=True` decodes
with a StaticCache and a torch.compile'd step (same samples; pays for many batches in one process).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, PreTrainedModel, StaticCache

from stage2_prior.model import SamplingConfig, TokenLayout, layout_of, prefix_ids

# transformers renamed the KV cache argument and output field `past_key_values` -> `cache` (5.2x, with a
# FutureWarning on the old name); use whichever this version has.
CACHE = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering of (B, V) logits; filtered entries become -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it already
        # does (>=: at an exact tie the token is not needed, as transformers' TopPLogitsWarper decides).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per row of (B, V) probabilities by inverting the CDF at a uniform draw.

    Exact like torch.multinomial, and ~20x cheaper on CPU for one draw per row (multinomial draws V
    exponentials per row).
    """
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(1)  # first index whose CDF exceeds u
    return token.clamp_max(probs.shape[-1] - 1)  # guards u == total under rounding


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log-probabilities: log p_u + s (log p_c - log p_u)."""
    lc, lu = cond.log_softmax(-1), uncond.log_softmax(-1)
    return lu + scale * (lc - lu)


def _decode_step(model: PreTrainedModel, cache: StaticCache, input_ids: torch.Tensor, position: torch.Tensor):
    out = model(input_ids=input_ids, use_cache=True, cache_position=position, **{CACHE: cache})
    return out.logits[:, -1]  # (B, V)


class CompiledDecoder:
    """A StaticCache and a `torch.compile`d decode step for one (batch size, device, dtype) of one prior.

    torch.compile specialises on shapes and guards on the objects it reads, so the step is compiled once per
    decoder, and `decoder_for` keeps decoders to be reused across `sample_codes` calls; the static cache fixes
    every shape. The decoder does not hold the model (it is passed in), so keeping decoders per model does not
    keep the model alive. The first call pays the compilation (15-30 s for the demo prior on a 2-core CPU);
    later ones run ~1.6x faster than the eager loop there (docs/benchmarks.md).
    """

    def __init__(self, model: PreTrainedModel, layout: TokenLayout):
        self.cache = StaticCache(config=model.config, max_cache_len=layout.seq_len)
        self._step = torch.compile(_decode_step, dynamic=False)

    def step(self, model: PreTrainedModel, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self._step(model, self.cache, input_ids, position)

    def prefill(self, model: PreTrainedModel, prompt: torch.Tensor) -> torch.Tensor:
        """Start a new batch: empty the cache and run the prompt eagerly (its length varies)."""
        self.cache.reset()
        position = torch.arange(prompt.shape[1], device=prompt.device)
        return _decode_step(model, self.cache, prompt, position)  # (B, V)


@contextmanager
def eager_attention(model: PreTrainedModel):
    """Run the prior with transformers' "eager" (math) attention inside the block, its own setting after.

    Compiled, the math attention of one query token fuses into the decode step, where SDPA stays an
    opaque kernel over all the static cache's positions: 280 vs 324 ms for 100 images (docs/benchmarks.md).
    The setting is read at every forward, so training and evaluation outside the block are unaffected.
    """
    old = model.config._attn_implementation  # the getter transformers documents for the current setting
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


# Compiled decoders per model, outside the model (it stays a plain transformers model: no extra state to
# save, copy or move); they go when the model does.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: PreTrainedModel, batch: int) -> CompiledDecoder:
    """The model's CompiledDecoder for this batch size, device and dtype, made on first use."""
    param = next(model.parameters())
    decoders = _DECODERS.setdefault(model, {})
    key = (batch, str(param.device), param.dtype)  # the static cache is allocated for exactly these
    if key not in decoders:
        decoders[key] = CompiledDecoder(model, layout_of(model))
    return decoders[key]


@torch.no_grad()
def sample_codes(
    model: PreTrainedModel,
    n: int,
    classes: torch.Tensor | list[int] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress=None,
    prefix_codes: torch.Tensor | None = None,
    compile: bool = False,
    decoding: str | None = None,
    window: int = 8,
    stats: dict | None = None,
    settings: SamplingConfig | None = None,
) -> torch.Tensor:
    """Sample (n, h, w) code grids with the KV cache; never returns a special token.

    Args:
        classes: (n,) class ids for a conditional prior; None samples unconditionally (NULL token).
        temperature, top_k, top_p, guidance_scale: the sampling settings (`settings` instead: already resolved).
            temperature 0 is greedy; top_k / top_p keep the k most likely codes / the smallest set holding mass
            top_p; guidance != 1 runs conditional and NULL prompts as one doubled batch (ignored for
            unconditional samples). Settings left None take the prior's recommendation (`SamplingConfig.resolve`).
        generator: a torch.Generator on the model's device for reproducible samples.
        progress: optional callable(tokens_done) for progress bars.
        prefix_codes: (n, L) codes that are kept as given (image completion); the rest is sampled.
        compile: decode with a StaticCache and a torch.compile'd step (`CompiledDecoder`). Same samples; pays
            when many batches are drawn in one process, since the first call compiles.
        decoding: "sequential" (`sequential_decode`, one forward per code) or "jacobi" (`jacobi_decode`: `window`
            tokens verified per forward, the same distribution in fewer forwards). None: jacobi for batches of
            at most JACOBI_MAX_BATCH images (one), where a forward costs about the same whatever it carries,
            else sequential (docs/benchmarks.md).
        window: tokens fed per jacobi forward (the pending token and window - 1 drafts). 8 was the fastest of
            4, 8 and 16 at batch 1 on this CPU, in two runs (docs/benchmarks.md).
        stats: a dict that receives "forwards" (model calls), "decoding", "window" (jacobi's, else None) and
            "settings" (the resolved settings).
    """
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
    if settings is None:
        settings = SamplingConfig.resolve(model.generation_config, **given)
    elif any(v is not None for v in given.values()):
        raise ValueError("pass the sampling settings either as `settings` or one by one, not both")
    layout = layout_of(model)
    device = next(model.parameters()).device
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.shape != (n,):
            raise ValueError(f"classes must have shape ({n},), got {tuple(classes.shape)}")
    guided = classes is not None and settings.guidance_scale != 1.0
    batch_size = batch_size or n
    if decoding is None:
        decoding = "jacobi" if min(batch_size, n) <= JACOBI_MAX_BATCH and not compile else "sequential"
    if decoding not in ("sequential", "jacobi"):
        raise ValueError(f"decoding must be 'sequential' or 'jacobi', got {decoding!r}")
    if decoding == "jacobi" and (compile or window < 2):
        raise ValueError("jacobi decoding needs window >= 2 and does not combine with compile")
    forwards = 0
    was_training = model.training
    model.eval()
    out = []
    with eager_attention(model) if compile else nullcontext():
        for lo in range(0, n, batch_size):
            m = min(batch_size, n - lo)
            cls = classes[lo : lo + m] if classes is not None else None
            prompt = prefix_ids(layout, m, cls, device)  # (m, 2)
            if guided:
                prompt = torch.cat([prompt, prefix_ids(layout, m, None, device)])  # (2m, 2): cond rows, then NULL rows
            codes = torch.empty(m, layout.num_codes, dtype=torch.long, device=device)
            start = 0
            if prefix_codes is not None:
                fixed = prefix_codes[lo : lo + m].to(device=device, dtype=torch.long)  # (m, L)
                start = fixed.shape[1]
                codes[:, :start] = fixed
                prompt = torch.cat([prompt, torch.cat([fixed, fixed]) if guided else fixed], dim=1)
            if decoding == "jacobi":
                mix = dict(guided=guided, scale=settings.guidance_scale, temperature=settings.temperature,
                           top_k=settings.top_k, top_p=settings.top_p)  # fmt: skip
                forwards += jacobi_decode(model, layout, prompt, codes, start, window, generator, progress, **mix)
            else:
                forwards += sequential_decode(model, layout, prompt, codes, start, settings, guided, generator,
                                              progress, compile)  # fmt: skip
            out.append(codes.view(m, layout.height, layout.width))  # (m, h, w)
    model.train(was_training)
    if stats is not None:
        window_used = window if decoding == "jacobi" else None
        stats.update(forwards=forwards, decoding=decoding, window=window_used, settings=dataclasses.asdict(settings))
    return torch.cat(out)


def sequential_decode(
    model, layout, prompt, codes, start: int, settings: SamplingConfig, guided: bool, generator, progress, compile
) -> int:
    """Fill codes[:, start:] (m, h*w) one code per forward through the KV cache (or the compiled step); the
    prompt holds the conditional rows, then (guided) the NULL rows. Returns the number of forwards."""
    m, device = codes.shape[0], codes.device
    if compile:
        decoder = decoder_for(model, prompt.shape[0])
        last = decoder.prefill(model, prompt)  # (B, V)
    else:
        step_out = model(input_ids=prompt, use_cache=True)
        last = step_out.logits[:, -1]  # (B, V)
    for t in range(start, layout.num_codes):
        logits = last[:, : layout.codebook_size].float()  # only codes can be drawn
        if guided:
            logits = guided_logits(logits[:m], logits[m:], settings.guidance_scale)
        if settings.temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p).softmax(-1)
            token = draw(probs, generator)
        codes[:, t] = token
        if t + 1 < layout.num_codes:
            feed = (torch.cat([token, token]) if guided else token)[:, None]  # (B, 1)
            if compile:
                last = decoder.step(model, feed, torch.tensor([prompt.shape[1] + t - start], device=device))
            else:
                step_out = model(input_ids=feed, use_cache=True, **{CACHE: getattr(step_out, CACHE)})
                last = step_out.logits[:, -1]
        if progress is not None:
            progress(m)
    return layout.num_codes - start


# --------------------------------------------------------------------------------------------------
# Speculative Jacobi decoding (Teng et al., ICLR 2025)

# Where jacobi decoding is the default: one image at a time. On this CPU it took 1.9-2.0x fewer forwards and
# 1.0-1.1x less time than the sequential loop at batch 1 (2026-11-26), but was slower from batch 10 on, where a
# forward's cost grows with the tokens it carries and the KV cache carries masked slots (docs/benchmarks.md).
JACOBI_MAX_BATCH = 1


def target_probs(logits: torch.Tensor, m: int, guided: bool, scale: float, temperature: float, top_k, top_p):
    """(rows, S, V) prior logits -> (m, S, K) the distribution that sequential sampling draws each code from
    (guided rows: conditional first, NULL second; temperature 0: one-hot at the argmax)."""
    logits = logits.float()
    if guided:
        logits = guided_logits(logits[:m], logits[m:], scale)
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    flat = filter_logits(logits.reshape(-1, logits.shape[-1]) / temperature, top_k, top_p)
    return flat.softmax(-1).view(logits.shape)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept `draft` (drawn from q) with probability min(1, p(draft) / q(draft)), u uniform in [0, 1)."""
    p_x = p.gather(-1, draft[..., None]).squeeze(-1)
    q_x = q.gather(-1, draft[..., None]).squeeze(-1)
    return (u * q_x <= p_x) & (p_x > 0)  # never a token the target cannot draw, even at u == 0


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to draw from after a rejection: max(0, p - q), normalised (p itself where p <= q)."""
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


@torch.no_grad()
def jacobi_decode(
    model, layout: TokenLayout, prompt, codes, start, window, generator, progress, guided, scale, **mix
) -> int:
    """Fill codes[:, start:] by speculative Jacobi decoding; returns the number of model forwards.

    Every forward feeds each row its pending token (committed, not yet in the KV cache) and `window - 1` draft
    tokens for the next positions, drawn from proposals q (uniform at first, then the distributions the last
    forward gave for those positions). Draft j is accepted with probability min(1, p_j / q_j), p_j being the
    target given everything before it; at the first rejection a token is drawn from the residual
    max(0, p - q) and the row stops for this forward; if every draft is accepted, the last output gives a
    bonus token. This is speculative sampling, so every code has exactly the sequential distribution.

    Rows accept different numbers of tokens: each keeps its own position ids, and the KV-cache slots of
    rejected drafts stay in the cache but are masked out of attention, so no row waits for another. A single
    image (or guided pair) crops them from the cache instead, which needs no mask.
    """
    m, total = codes.shape
    K, device = layout.codebook_size, prompt.device
    if start >= total:  # a completion prefix that covers the whole grid: nothing left to sample
        return 0
    twice = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    out = model(input_ids=prompt, use_cache=True)
    cache = getattr(out, CACHE)
    first = target_probs(out.logits[:, -1:, :K], m, guided, scale, **mix)[:, 0]  # (m, K)
    codes[:, start] = draw(first, generator)
    count = torch.full((m,), start + 1, dtype=torch.long, device=device)  # committed codes per row
    valid = torch.ones(prompt.shape, dtype=torch.bool, device=device)  # cache slots of committed tokens
    q = torch.full((m, total + window, K), 1.0 / K, device=device)  # proposals per code position (padded)
    rows, steps, forwards = torch.arange(m, device=device), torch.arange(window, device=device), 1
    if progress is not None:
        progress(m)
    while bool((count < total).any()):
        active = count < total  # (m,)
        pos = (count - 1)[:, None] + steps  # (m, W) code positions fed: the pending token, then the drafts
        fed = active[:, None] & (pos < total)
        q_drafts = q[rows[:, None], pos[:, 1:]]  # (m, W-1, K)
        drafts = draw(q_drafts.reshape(-1, K), generator).view(m, window - 1)
        tokens = torch.cat([codes[rows, count - 1][:, None], drafts], 1)  # (m, W)
        if m == 1:  # one image (guided: one pair): rejected drafts are cropped from the cache, no mask needed
            n_fed = int(fed.sum())
            out = model(input_ids=twice(tokens[:, :n_fed]), use_cache=True, **{CACHE: cache})
            logits = F.pad(out.logits[..., :K], (0, 0, 0, window - n_fed))  # positions past the grid: unused
        else:
            out = model(
                input_ids=twice(tokens),
                position_ids=twice(2 + pos.clamp_max(total - 1)),  # code i sits at position 2 + i
                attention_mask=torch.cat([valid, twice(fed)], 1).long(),
                use_cache=True,
                **{CACHE: cache},
            )
            logits = out.logits[..., :K]
        cache, forwards = getattr(out, CACHE), forwards + 1
        p = target_probs(logits, m, guided, scale, **mix)  # (m, W, K): p[:, j] is for position pos + 1
        u = torch.rand(m, window - 1, generator=generator, device=device)
        ok = speculative_accept(p[:, :-1], q_drafts, drafts, u) & (pos[:, 1:] < total)
        accepted = torch.minimum(ok.long().cumprod(1).sum(1), (total - count).clamp_min(0))  # (m,)
        # One more token at position count + accepted, unless the row is full: the residual after a rejection,
        # or the bonus from the last output when every draft was accepted.
        j = accepted.clamp_max(window - 2)
        after_reject = residual(p[rows, j], q_drafts[rows, j])
        extra_dist = torch.where((accepted < window - 1)[:, None], after_reject, p[:, -1])
        extra = draw(extra_dist, generator)
        has_extra = active & (count + accepted < total)
        keep = (steps[None, : window - 1] < accepted[:, None]) & active[:, None]  # (m, W-1) accepted drafts
        target_pos = (count[:, None] + steps[None, : window - 1]).clamp_max(total - 1)
        codes[rows[:, None].expand_as(keep)[keep], target_pos[keep]] = drafts[keep]
        extra_pos = (count + accepted).clamp_max(total - 1)
        codes[rows[has_extra], extra_pos[has_extra]] = extra[has_extra]
        # Cache slots of this forward that hold committed tokens: the pending token and the accepted drafts.
        if m == 1:
            rejected = n_fed - 1 - int(accepted[0])  # fed slots past the pending token and the accepted drafts
            if rejected > 0:
                cache.crop(-rejected)
        else:
            valid = torch.cat([valid, twice(fed & torch.cat([fed[:, :1], keep], 1))], 1)
        # The next proposals: this forward's distributions for the positions still open.
        open_ = (pos + 1 >= (count + accepted + has_extra.long())[:, None]) & fed
        q[rows[:, None].expand_as(open_)[open_], (pos + 1)[open_]] = p[open_]
        done = accepted + has_extra.long()
        count = count + done * active.long()
        if progress is not None:
            progress(int(done[active].sum()))
    return forwards
