"""What to train on: `ObjectiveConfig` (the objective and its span options) with its named presets,
and `SpecialIds` (the token ids the objectives write).

Shared by `glmkit.data.spans` (which reads the span options and ids) and `glmkit.data.objectives`
(which writes the samples); both import from here, so neither imports the other's caller. No model,
no torch, no tokenizer import: `SpecialIds.from_tokenizer` reads any object with the ids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from glmkit.errors import GlmkitError


@dataclass(frozen=True)
class SpecialIds:
    """The token ids the objectives write. Build it from a tokenizer with `from_tokenizer`."""
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    eot: int
    pad: int
    vocab_size: int
    sentence_ends: tuple[int, ...] = ()     # ids that end a sentence ("." "!" "?" "。" ...), for [sMASK]
    other_special: tuple[int, ...] = ()     # further ids MLM must never draw as a random replacement

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        """From any object with `mask_id, smask_id, gmask_id, sop_id, eop_id, eot_id, pad_id,
        vocab_size, sentence_end_ids` (e.g. `glmkit.data.tokenizer.GLMTokenizer`)."""
        other = getattr(tok, "special_ids", None) or getattr(tok, "all_special_ids", None) or ()
        return cls(mask=int(tok.mask_id), smask=int(tok.smask_id), gmask=int(tok.gmask_id),
                   sop=int(tok.sop_id), eop=int(tok.eop_id), eot=int(tok.eot_id), pad=int(tok.pad_id),
                   vocab_size=int(tok.vocab_size),
                   sentence_ends=tuple(int(i) for i in tok.sentence_end_ids),
                   other_special=tuple(sorted(int(i) for i in other)))

    @property
    def specials(self) -> np.ndarray:
        ids = (self.mask, self.smask, self.gmask, self.sop, self.eop, self.eot, self.pad) + self.other_special
        return np.unique(np.array(ids, dtype=np.int64))

    def random_pool(self) -> np.ndarray:
        """The ids MLM may draw as a random replacement: the vocabulary without special tokens."""
        pool = getattr(self, "_pool", None)
        if pool is None:
            pool = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), self.specials)
            object.__setattr__(self, "_pool", pool)
        return pool


@dataclass
class ObjectiveConfig:
    """What to train on. `kind`: glm (blank infilling, mixing the three mask kinds), mlm or clm."""
    kind: str = "glm"
    mask_ratio: float = 0.15                  # share of tokens masked ([MASK], [sMASK], MLM)
    poisson_lambda: float = 3.0               # [MASK] span lengths ~ Poisson(lambda) restricted to 1..max_span
    max_span: int = 39
    mixture: tuple[float, float, float] = (1.0, 0.0, 0.0)   # P([MASK]), P([sMASK]), P([gMASK])
    mix_per: str = "sample"                   # "sample": each sample draws its kind; "batch": one per batch
    layout: str = "glm"                       # attention of Part B: "glm" (all earlier B) or "span" (own span)
    shuffle_spans: bool = True                # Part B in random span order (False: left to right, the ablation)
    gmask_min_ratio: float = 0.5              # [gMASK] span length ~ uniform share of the document
    gmask_max_ratio: float = 1.0
    gmask_suffix_prob: float = 0.5            # else a middle infill; always suffix when a row packs several
    mlm_mask_prob: float = 0.8                # of the selected MLM tokens: 80% [MASK],
    mlm_random_prob: float = 0.1              # 10% a random non-special token, the rest unchanged
    max_tries: int = 8                        # redraws of [MASK] spans that cannot be placed before skipping

    def __post_init__(self):
        self.mixture = tuple(float(p) for p in self.mixture)
        self.validate()

    def validate(self) -> None:
        def bad(what, fix):
            raise GlmkitError(f"objective config: {what}; {fix}")
        if self.kind not in ("glm", "mlm", "clm"):
            bad(f"kind={self.kind!r} is unknown", "use 'glm', 'mlm' or 'clm'")
        if self.layout not in ("glm", "span"):
            bad(f"layout={self.layout!r} is unknown", "use 'glm' or 'span'")
        if self.mix_per not in ("sample", "batch"):
            bad(f"mix_per={self.mix_per!r} is unknown", "use 'sample' or 'batch'")
        if not 0.0 < self.mask_ratio < 1.0:
            bad(f"mask_ratio={self.mask_ratio} is out of range", "pick a share strictly between 0 and 1 (paper: 0.15)")
        if not self.poisson_lambda > 0:
            bad(f"poisson_lambda={self.poisson_lambda} must be positive", "the paper uses 3")
        if not 1 <= self.max_span <= 10_000:
            bad(f"max_span={self.max_span} is out of range", "use 1..10000 (paper: 39)")
        if len(self.mixture) != 3 or min(self.mixture) < 0 or abs(sum(self.mixture) - 1) > 1e-6:
            bad(f"mixture={self.mixture} is not three probabilities summing to 1",
                "give P([MASK]), P([sMASK]), P([gMASK]), e.g. (0.5, 0.3, 0.2)")
        if not 0.0 < self.gmask_min_ratio <= self.gmask_max_ratio <= 1.0:
            bad(f"gmask ratios {self.gmask_min_ratio}..{self.gmask_max_ratio} are out of range",
                "need 0 < gmask_min_ratio <= gmask_max_ratio <= 1 (paper: 0.5..1)")
        if not 0.0 <= self.gmask_suffix_prob <= 1.0:
            bad(f"gmask_suffix_prob={self.gmask_suffix_prob} is not a probability", "use 0..1")
        if min(self.mlm_mask_prob, self.mlm_random_prob) < 0 or self.mlm_mask_prob + self.mlm_random_prob > 1:
            bad(f"mlm_mask_prob + mlm_random_prob = {self.mlm_mask_prob + self.mlm_random_prob} is out of range",
                "both must be >= 0 and sum to at most 1 (BERT: 0.8 and 0.1)")
        if self.max_tries < 1:
            bad(f"max_tries={self.max_tries} must be >= 1", "use e.g. 8")

    def check(self, specials: SpecialIds) -> None:
        """Checks that need the tokenizer's ids."""
        if self.kind == "glm" and self.mixture[1] > 0 and not specials.sentence_ends:
            raise GlmkitError("objective config: [sMASK] has weight but the tokenizer gives no sentence_end_ids; "
                              "use a tokenizer that defines sentence ends or set the [sMASK] weight to 0")
        if self.kind == "mlm" and len(specials.random_pool()) == 0:
            raise GlmkitError("objective config: MLM needs non-special tokens to draw; the vocabulary has none")

    @classmethod
    def from_name(cls, name: str, **overrides) -> ObjectiveConfig:
        if name not in PRESETS:
            raise GlmkitError(f"unknown objective preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def min_length(self) -> int:
        """The shortest sample this objective can corrupt (GLM: int(ratio*L) >= 1; CLM: 2; MLM: 1)."""
        if self.kind == "glm":
            return max(2, math.ceil(1 / self.mask_ratio - 1e-9))
        return 2 if self.kind == "clm" else 1


PRESETS: dict[str, ObjectiveConfig] = {
    "glm-large": ObjectiveConfig(kind="glm", mixture=(1.0, 0.0, 0.0)),
    "glm-10b": ObjectiveConfig(kind="glm", mixture=(0.5, 0.3, 0.2), mix_per="batch"),
    "glm-130b": ObjectiveConfig(kind="glm", mixture=(0.3, 0.0, 0.7)),
    # the paper's ablation: Part B in left-to-right span order instead of a random permutation
    "glm-noshuffle": ObjectiveConfig(kind="glm", mixture=(1.0, 0.0, 0.0), shuffle_spans=False),
    "bert": ObjectiveConfig(kind="mlm"),
    "gpt": ObjectiveConfig(kind="clm"),
}
