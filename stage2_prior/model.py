"""The stage-2 prior: a transformers causal LM (GPT-2 or Llama) over code grids in raster order, and its loader.

Token layout (K codes, C classes):
    0 .. K-1      codes, raster order (row by row)
    K             BOS
    K+1 .. K+C    one token per class
    K+C+1         NULL class (unconditional; class dropout and classifier-free guidance use it)
    sequence = [BOS, class or NULL, code_0, ..., code_{h*w-1}]; labels are -100 on the two prefix tokens.
Unlabelled data has C = 0 and every sequence carries NULL.

`config.vqgen` holds the layout, the prior's own config and the `CodesMeta` of the codes it learned (grid, class
names, both fingerprints, the data the codes were extracted from), so a prior is never paired with codes or a
decoder it was not trained for. Sampling lives in `stage2_prior.sampling`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from vqgen.cli import VqgenError
from vqgen.codes import CodesMeta
from vqgen.config import option
from vqgen.hub import resolve_folder


@dataclass
class PriorConfig:
    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 256
    dropout: float = option(0.1, "residual, embedding and attention dropout")
    class_dropout: float = option(0.1, "probability that a class token is replaced by NULL during training")

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0 <= self.dropout < 1 or not 0 <= self.class_dropout <= 1:
            raise ValueError("dropout must be in [0, 1) and class_dropout in [0, 1]")


@dataclass
class SamplingConfig:
    """The prior's recommended sampling settings, written into its generation_config; sampling uses them when
    the caller gives none. Choose them with a sweep on the validation split (stage2_prior.quality --sweep)."""

    guidance_scale: float = option(1.0, "classifier-free guidance (1.0: none)")
    temperature: float = 1.0
    top_k: int | None = option(None, "keep the k most likely codes; 0 or null: off (as in transformers' generate)")
    top_p: float | None = option(None, "keep the smallest set of codes holding this mass; 1.0 or null: off")

    def __post_init__(self):
        if self.temperature < 0 or self.guidance_scale < 0:
            raise ValueError("temperature and guidance_scale must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")

    @classmethod
    def resolve(cls, generation_config, **given) -> SamplingConfig:
        """The settings a sampling call uses, resolved and validated once: each one given (not None), else the
        prior's recommendation in its generation_config, else plain sampling (no guidance, temperature 1, no
        filtering). To switch a recommended filter off, give its off value (top_k 0, top_p 1.0): None means
        "the recommendation". A value out of range is one VqgenError."""
        values = {}
        for f in dataclasses.fields(cls):
            value = given.get(f.name)
            if value is None:
                value = getattr(generation_config, f.name, None)
            values[f.name] = f.default if value is None else value
        try:
            return cls(**values)
        except ValueError as e:
            raise VqgenError(f"sampling: {e}") from None


@dataclass
class TokenLayout:
    codebook_size: int  # K
    num_classes: int  # C (0: unconditional)
    height: int
    width: int

    @classmethod
    def from_meta(cls, meta: CodesMeta, conditional: bool = True) -> TokenLayout:
        """The layout for a code dataset; `conditional=False` ignores its labels."""
        num_classes = len(meta.class_names) if conditional and meta.class_names else 0
        return cls(codebook_size=meta.codebook_size, num_classes=num_classes, height=meta.height, width=meta.width)

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


def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: the code NLL only (the prefix is given, not predicted)."""
    labels = input_ids.clone()
    labels[:, :2] = -100
    return labels


def build_prior(
    cfg: PriorConfig,
    layout: TokenLayout,
    codes: CodesMeta,
    code_dataset: str,
    sampling: SamplingConfig | None = None,
) -> PreTrainedModel:
    """A fresh GPT2LMHeadModel or LlamaForCausalLM sized for the layout; the contract in `config.vqgen`, the
    recommended sampling settings in its generation_config."""
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
    model.config.vqgen = {
        "layout": asdict(layout),
        "prior": asdict(cfg),
        "codes": asdict(codes),
        "code_dataset": code_dataset,  # where the codes were read from (evaluation's default)
    }
    model.generation_config.bos_token_id = layout.bos
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = layout.null
    model.generation_config.do_sample = True
    model.generation_config.max_new_tokens = layout.num_codes
    model.generation_config.min_new_tokens = layout.num_codes
    for key, value in asdict(sampling or SamplingConfig()).items():
        setattr(model.generation_config, key, value)
    return model


def layout_of(model: PreTrainedModel) -> TokenLayout:
    meta = getattr(model.config, "vqgen", None)
    if not meta or "layout" not in meta:
        raise VqgenError("this model has no vqgen token layout in its config.json; it is not a vqgen prior")
    return TokenLayout(**meta["layout"])


def codes_meta_of(model: PreTrainedModel) -> CodesMeta:
    """The CodesMeta of the codes this prior learned."""
    return CodesMeta.from_json_dict(model.config.vqgen.get("codes"), "the prior's config.json (vqgen.codes)")


def load_prior(name_or_path: str | os.PathLike) -> PreTrainedModel:
    """A vqgen prior from a folder or Hub id: safetensors only, no remote code; checks it is a vqgen prior."""
    folder = resolve_folder(name_or_path, "prior", allow_patterns=["*.json", "*.safetensors", "*.md", "*.png"])
    if not (folder / "model.safetensors").is_file():
        raise VqgenError(f"{folder} has no model.safetensors (pickle checkpoints are never loaded)")
    if not (folder / "config.json").is_file():
        raise VqgenError(f"{folder} has no config.json; is this a vqgen prior folder?")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False)
    except (ValueError, OSError) as e:  # e.g. a VQ-VAE folder: "Unrecognized model"
        raise VqgenError(f"{folder} is not a vqgen prior (transformers cannot load it: {str(e)[:120]})") from None
    layout_of(model)  # raises when it is not a vqgen prior
    codes_meta_of(model)
    return model.eval()


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
