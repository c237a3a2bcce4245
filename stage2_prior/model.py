"""The stage-2 prior: a transformers causal LM over code grids in raster order, and fast KV-cached sampling.

Token layout (K codes, C classes):
    0 .. K-1      codes, raster order (row by row)
    K             BOS
    K+1 .. K+C    one token per class
    K+C+1         NULL class (unconditional; class dropout and classifier-free guidance use it)
    sequence = [BOS, class or NULL, code_0, ..., code_{h*w-1}]; labels are -100 on the two prefix tokens.
Unlabelled data has C = 0 and every sequence carries NULL.

The layout, grid, class names and both fingerprints (code dataset, VQ-VAE) travel in `config.vqgen`, so a
prior is never paired with codes or a decoder it was not trained for.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel, StaticCache

from stage1_vqvae.common import VqgenError


@dataclass
class PriorConfig:
    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.1  # residual, embedding and attention dropout
    class_dropout: float = 0.1  # probability that a class token is replaced by NULL during training

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0 <= self.dropout < 1 or not 0 <= self.class_dropout <= 1:
            raise ValueError("dropout must be in [0, 1) and class_dropout in [0, 1]")


@dataclass
class TokenLayout:
    codebook_size: int  # K
    num_classes: int  # C (0: unconditional)
    height: int
    width: int

    @property
    def bos(self) -> int:
        return self.codebook_size

    @property
    def null(self) -> int:
        return self.codebook_size + 1 + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 2

    @property
    def num_codes(self) -> int:
        return self.height * self.width

    @property
    def seq_len(self) -> int:
        return 2 + self.num_codes

    def class_token(self, classes: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            raise VqgenError("this prior is unconditional: it has no class tokens")
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise VqgenError(f"class ids must lie in [0, {self.num_classes}); got {classes.tolist()}")
        return self.codebook_size + 1 + classes


def prefix_ids(layout: TokenLayout, n: int, classes: torch.Tensor | None, device=None) -> torch.Tensor:
    """(n, 2) prompts [BOS, class or NULL]."""
    bos = torch.full((n, 1), layout.bos, dtype=torch.long, device=device)
    if classes is None:
        cls = torch.full((n, 1), layout.null, dtype=torch.long, device=device)
    else:
        cls = layout.class_token(classes.to(device=device, dtype=torch.long)).view(n, 1)
    return torch.cat([bos, cls], dim=1)


def grid_to_input_ids(codes: torch.Tensor, layout: TokenLayout, classes: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w) codes (+ optional (B,) classes) -> (B, 2 + h*w) input ids."""
    b = codes.shape[0]
    flat = codes.reshape(b, -1).long()  # (B, h*w), raster order
    return torch.cat([prefix_ids(layout, b, classes, codes.device), flat], dim=1)


def input_ids_to_grid(input_ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, 2 + h*w) -> (B, h, w) codes."""
    codes = input_ids[:, 2:]
    if codes.shape[1] != layout.num_codes:
        raise ValueError(f"expected {layout.num_codes} code tokens, got {codes.shape[1]}")
    return codes.reshape(-1, layout.height, layout.width)  # (B, h, w)


def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: the code NLL only (the prefix is given, not predicted)."""
    labels = input_ids.clone()
    labels[:, :2] = -100
    return labels


def build_prior(cfg: PriorConfig, layout: TokenLayout, vqgen_meta: dict | None = None) -> PreTrainedModel:
    """A fresh GPT2LMHeadModel or LlamaForCausalLM sized for the layout; metadata in `config.vqgen`."""
    common = dict(
        vocab_size=layout.vocab_size,
        bos_token_id=layout.bos,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    if cfg.arch == "gpt2":
        # "gelu_pytorch_tanh" is GPT-2's tanh-approximated GELU ("gelu_new") as one fused PyTorch kernel
        # instead of five elementwise ops: the stage-2 training step is ~12% faster on CPU (benchmarks/).
        hf_cfg = GPT2Config(
            n_positions=layout.seq_len,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            activation_function="gelu_pytorch_tanh",
            **common,
        )
        model = GPT2LMHeadModel(hf_cfg)
    else:
        hf_cfg = LlamaConfig(
            hidden_size=cfg.n_embd,
            intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=layout.seq_len,
            attention_dropout=cfg.dropout,
            **common,
        )
        model = LlamaForCausalLM(hf_cfg)
    model.config.vqgen = {"layout": asdict(layout), "prior": asdict(cfg), **(vqgen_meta or {})}
    model.generation_config.bos_token_id = layout.bos
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = layout.null
    model.generation_config.do_sample = True
    model.generation_config.max_new_tokens = layout.num_codes
    model.generation_config.min_new_tokens = layout.num_codes
    return model


def layout_of(model: PreTrainedModel) -> TokenLayout:
    meta = getattr(model.config, "vqgen", None)
    if not meta or "layout" not in meta:
        raise VqgenError("this model has no vqgen token layout in its config.json; it is not a vqgen prior")
    return TokenLayout(**meta["layout"])


def check_fingerprints(prior_meta: dict, other: dict, what: str) -> None:
    """Raise a clear error when a prior meets codes or a VQ-VAE it was not trained with."""
    for key in ("codebook_size",):
        if key in other and other[key] != prior_meta["layout"]["codebook_size"]:
            raise VqgenError(
                f"{what} has K={other[key]} but the prior was trained for K={prior_meta['layout']['codebook_size']}"
            )
    if "grid" in other and list(other["grid"]) != [prior_meta["layout"]["height"], prior_meta["layout"]["width"]]:
        raise VqgenError(
            f"{what} has a {other['grid']} code grid but the prior models "
            f"{[prior_meta['layout']['height'], prior_meta['layout']['width']]}"
        )
    mine, theirs = prior_meta.get("vqvae_fingerprint"), other.get("vqvae_fingerprint")
    if mine and theirs and mine != theirs:
        raise VqgenError(
            f"{what} comes from VQ-VAE {theirs[:16]}… but the prior was trained on codes of VQ-VAE "
            f"{mine[:16]}… (fingerprints differ). Use the matching VQ-VAE, or retrain the prior"
        )


# --------------------------------------------------------------------------------------------------
# Sampling


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering of (B, V) logits; filtered entries become -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
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


class CompiledDecoder:
    """A StaticCache and a `torch.compile`d decode step for one (batch size, device) of one prior.

    torch.compile specialises on shapes and guards on the objects it reads, so the step is compiled once per
    decoder and the decoder is kept on the model (`decoder_for`) to be reused across `sample_codes` calls;
    the static cache fixes every shape. The first call pays the compilation (15-30 s for the demo prior on
    a 2-core CPU); later ones run ~1.6x faster than the eager loop there (docs/benchmarks.md).
    """

    def __init__(self, model: PreTrainedModel, layout: TokenLayout):
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=layout.seq_len)
        self.step = torch.compile(self._step, dynamic=False)

    def _step(self, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, cache_position=position)
        return out.logits[:, -1]  # (B, V)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Start a new batch: empty the cache and run the prompt eagerly (its length varies)."""
        self.cache.reset()
        position = torch.arange(prompt.shape[1], device=prompt.device)
        out = self.model(input_ids=prompt, past_key_values=self.cache, use_cache=True, cache_position=position)
        return out.logits[:, -1]  # (B, V)


@contextmanager
def eager_attention(model: PreTrainedModel):
    """Run the prior with transformers' "eager" (math) attention inside the block, its own setting after.

    Compiled, the math attention of one query token fuses into the decode step, where SDPA stays an
    opaque kernel over all the static cache's positions: 280 vs 324 ms for 100 images (docs/benchmarks.md).
    The setting is read at every forward, so training and evaluation outside the block are unaffected.
    """
    old = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = old


def decoder_for(model: PreTrainedModel, batch: int) -> CompiledDecoder:
    """The model's CompiledDecoder for this batch size, device and dtype, made on first use."""
    param = next(model.parameters())
    decoders = model.__dict__.setdefault("_vqgen_compiled_decoders", {})  # plain attribute, not a submodule
    key = (batch, str(param.device), param.dtype)  # the static cache is allocated for exactly these
    if key not in decoders:
        decoders[key] = CompiledDecoder(model, layout_of(model))
    return decoders[key]


@torch.no_grad()
def sample_codes(
    model: PreTrainedModel,
    n: int,
    classes: torch.Tensor | list[int] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress=None,
    prefix_codes: torch.Tensor | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Sample (n, h, w) code grids with the KV cache; never returns a special token.

    Args:
        classes: (n,) class ids for a conditional prior; None samples unconditionally (NULL token).
        temperature: softmax temperature; 0 means greedy.
        guidance_scale: classifier-free guidance; != 1 runs conditional and NULL prompts as one doubled batch.
        generator: a torch.Generator on the model's device for reproducible samples.
        progress: optional callable(tokens_done) for progress bars.
        prefix_codes: (n, L) codes that are kept as given (image completion); the rest is sampled.
        compile: decode with a StaticCache and a torch.compile'd step (`CompiledDecoder`). Same samples; pays
            when many batches are drawn in one process, since the first call compiles.
    """
    layout = layout_of(model)
    device = next(model.parameters()).device
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.shape != (n,):
            raise ValueError(f"classes must have shape ({n},), got {tuple(classes.shape)}")
    guided = classes is not None and guidance_scale != 1.0
    batch_size = batch_size or n
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
            if compile:
                decoder = decoder_for(model, prompt.shape[0])
                last = decoder.prefill(prompt)  # (B, V)
            else:
                step_out = model(input_ids=prompt, use_cache=True)
                last = step_out.logits[:, -1]  # (B, V)
            for t in range(start, layout.num_codes):
                logits = last[:, : layout.codebook_size].float()  # only codes can be drawn
                if guided:
                    logits = guided_logits(logits[:m], logits[m:], guidance_scale)
                if temperature == 0:
                    token = logits.argmax(-1)
                else:
                    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                    token = draw(probs, generator)
                codes[:, t] = token
                if t + 1 < layout.num_codes:
                    feed = (torch.cat([token, token]) if guided else token)[:, None]  # (B, 1)
                    if compile:
                        last = decoder.step(feed, torch.tensor([prompt.shape[1] + t - start], device=device))
                    else:
                        step_out = model(input_ids=feed, past_key_values=step_out.past_key_values, use_cache=True)
                        last = step_out.logits[:, -1]
                if progress is not None:
                    progress(m)
            out.append(codes.view(m, layout.height, layout.width))  # (m, h, w)
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def code_nll(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence -log p(codes | prefix) in nats, over the K code tokens only (the sampling distribution)."""
    layout = layout_of(model)
    logits = model(input_ids=input_ids).logits[:, 1:-1, : layout.codebook_size].float()  # predicts tokens 2..T-1
    logp = F.log_softmax(logits, dim=-1)
    target = input_ids[:, 2:]
    return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(1)  # (B,)


def bits_per_code(nll_nats_per_seq: float, layout: TokenLayout) -> float:
    return nll_nats_per_seq / layout.num_codes / math.log(2)
