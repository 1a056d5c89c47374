"""`GLMConfig`: one JSON-serialisable dataclass for every GLM generation, with named presets.

The families of DESIGN.md §2 differ only in a handful of switches:

| family | norm / residual | mlp | position_embedding (+ rope options) | other |
|---|---|---|---|---|
| GLM (2021) `glm-base`, `glm-large` | layernorm / pre | gelu, biases | learned_2d | tied head, out bias |
| GLM-130B `glm-130b` | layernorm / deepnorm | geglu | rope (rotate-half, full head) | tied head |
| ChatGLM-6B `chatglm-6b` | layernorm / deepnorm | gelu | rope_2d (half by position, half by block position) | |
| GLM-4 `glm-4-9b` (HF `Glm`) | rmsnorm / pre | swiglu | rope, interleaved pairs, first half of the head | GQA, qkv bias |
| GLM-4-0414 `glm-4-9b-0414` (HF `Glm4`) | rmsnorm / sandwich | swiglu | as GLM-4 | |
| GLM-4.5/4.6 (HF `Glm4MoeForCausalLM`) | rmsnorm / pre | swiglu dense first, then MoE | rope, rotate-half, half of the head | optional QK norm |

`rope_scaling` (1-D `rope` only) stretches the context window: linear, dynamic NTK or YaRN, the
dicts of `glmkit/model/rope_scaling.py` (as transformers' `rope_parameters` spell them).

Presets (`GLMConfig.from_name`): `tiny`, `tiny-moe` and one tiny config per family for tests
(`tiny-glm`, `tiny-glm130b`, `tiny-chatglm`, `tiny-0414`); `small` for CPU benchmarks; the
published shapes `glm-base`, `glm-large`, `glm-130b`, `chatglm-6b`, `glm-4-9b`, `glm-4-9b-0414`,
`glm-4.5`, `glm-4.5-air`, `glm-4.6`; and the DESIGN.md §4 bench shapes `bench-338m`, `bench-1.9b`.

Parameter counts come from the config alone (`num_params`), so a 355B preset is checked without
building it. `num_params(active=True)` counts only the experts a token runs through (MoE).

The config is the architecture only: how a run computes it (attention backend, Flex kernel options,
MoE implementation) is set on the model (`GLM.set_runtime`), never saved here.

Serialisation: `to_dict`/`from_dict` (an unknown key is a `GlmkitError` naming it; `RUNTIME_KEYS` that
older files carry are ignored), `save(path)` writes `config.json` (next to the weights when `path` is
a folder), `load(path)` reads it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from glmkit.errors import GlmkitError
from glmkit.model import rope_scaling

NORMS = ("layernorm", "rmsnorm")
RESIDUALS = ("pre", "deepnorm", "sandwich")
MLPS = ("gelu", "geglu", "swiglu")
POSITIONS = ("learned_2d", "rope", "rope_2d")
# Keys that older config.json files carry but that are run-time choices, not architecture (the
# attention backend is an option of a run: `GLM.set_runtime`). Read and ignored.
RUNTIME_KEYS = ("attention_backend",)


@dataclass
class GLMConfig:
    name: str = "custom"
    vocab_size: int = 151552
    hidden_size: int = 4096
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int | None = None        # None: = num_heads (MHA); fewer: GQA
    head_dim: int | None = None            # None: hidden_size // num_heads
    intermediate_size: int = 13696         # dense MLP width (per branch for gated MLPs)
    # normalisation and residual
    norm: str = "rmsnorm"                  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    residual: str = "pre"                  # pre | deepnorm (post-LN, x*alpha + f(x)) | sandwich (GLM-4-0414)
    # MLP
    mlp: str = "swiglu"                    # gelu (4h, one branch) | geglu (second half activated) | swiglu (first half)
    mlp_bias: bool = False
    gelu_approximate: str = "tanh"         # tanh | none (torch's F.gelu approximate=)
    # attention
    qkv_bias: bool = True
    out_bias: bool = False
    qk_norm: bool = False                  # per-head RMSNorm on q and k (GLM-4.5 `use_qk_norm`)
    # positions
    position_embedding: str = "rope"       # learned_2d | rope (1-D on position+block position) | rope_2d
    rope_interleaved: bool = True          # GLM-4: rotate (x0,x1),(x2,x3)..; False: rotate-half (GLM-4.5, 130B)
    partial_rotary_factor: float = 0.5     # share of each head that is rotated (rope only)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # rope only: None | {"rope_type": linear | dynamic | yarn, "factor": ..}
    max_position_embeddings: int = 8192    # (glmkit/model/rope_scaling.py: the keys of each type)
    tie_word_embeddings: bool = False
    # mixture of experts (n_routed_experts == 0: dense model)
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0         # the first k layers keep a dense MLP
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1                       # expert groups; top `topk_group` groups are eligible (HF semantics)
    topk_group: int = 1
    router_aux_loss_coef: float = 0.0      # >0: add a switch-style balance loss (GLM-4.5 uses 0: bias balancing)
    # initialisation
    initializer_range: float = 0.02

    # -- derived ---------------------------------------------------------------------------------
    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads == 0:
            self.head_dim = self.hidden_size // self.num_heads     # else validate() names the problem
        self.rope_scaling = rope_scaling.normalize(self.rope_scaling, self.max_position_embeddings)

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.first_k_dense_replace

    @property
    def context_length(self) -> int:
        """The most positions the model reads: `max_position_embeddings` stretched by `rope_scaling`
        (`glmkit.model.rope_scaling.context_length`, transformers' reading of each type)."""
        return rope_scaling.context_length(self.rope_scaling, self.max_position_embeddings)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates: the whole head split in two for rope_2d."""
        if self.position_embedding == "rope_2d":
            return self.head_dim // 2
        return int(self.head_dim * self.partial_rotary_factor)

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> GLMConfig:
        def bad(field, msg):
            raise GlmkitError(f"config {self.name!r}: {field} {msg}")

        for field, allowed in (("norm", NORMS), ("residual", RESIDUALS), ("mlp", MLPS),
                               ("position_embedding", POSITIONS),
                               ("gelu_approximate", ("tanh", "none"))):
            if getattr(self, field) not in allowed:
                bad(field, f"= {getattr(self, field)!r} is not one of {', '.join(allowed)}")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                      "max_position_embeddings"):
            if getattr(self, field) <= 0:
                bad(field, f"= {getattr(self, field)} must be positive")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"= {self.num_kv_heads} must divide num_heads = {self.num_heads} "
                "(set it to a divisor, or to num_heads for plain multi-head attention)")
        if self.head_dim is None:
            bad("num_heads", f"= {self.num_heads} does not divide hidden_size = {self.hidden_size}; choose a "
                "divisor, or set head_dim explicitly (GLM-4.5: 96 heads of 128 on a 4096 hidden size)")
        if self.head_dim <= 0 or self.head_dim % 2:
            bad("head_dim", f"= {self.head_dim} must be a positive even number")
        if self.position_embedding == "rope":
            if not 0 < self.partial_rotary_factor <= 1:
                bad("partial_rotary_factor", f"= {self.partial_rotary_factor} must be in (0, 1]")
            if self.rotary_dim % 2:
                bad("partial_rotary_factor", f"gives an odd rotary dim {self.rotary_dim}; choose a factor "
                    f"that makes head_dim * factor even (head_dim = {self.head_dim})")
        if self.rope_scaling is not None and self.position_embedding != "rope":
            bad("rope_scaling", f"needs position_embedding = 'rope' (this config has {self.position_embedding!r})")
        if self.position_embedding == "rope_2d" and self.head_dim % 4:
            bad("head_dim", f"= {self.head_dim} must be a multiple of 4 for rope_2d (two rotated halves)")
        if self.is_moe:
            self._validate_moe(bad)
        return self

    def _validate_moe(self, bad):
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            bad("num_experts_per_tok", f"= {self.num_experts_per_tok} must be in 1..n_routed_experts "
                f"({self.n_routed_experts})")
        if self.moe_intermediate_size <= 0:
            bad("moe_intermediate_size", "must be positive for a MoE config")
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            bad("n_group", f"= {self.n_group} must divide n_routed_experts = {self.n_routed_experts}")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            bad("n_group", "leaves fewer than 2 experts per group (group scores sum each group's top 2)")
        if not 0 < self.topk_group <= self.n_group:
            bad("topk_group", f"= {self.topk_group} must be in 1..n_group ({self.n_group})")
        if self.first_k_dense_replace < 0 or self.first_k_dense_replace > self.num_layers:
            bad("first_k_dense_replace", f"= {self.first_k_dense_replace} must be in 0..num_layers")
        if self.residual == "deepnorm":
            bad("residual", "= 'deepnorm' is not supported together with MoE layers")

    # -- parameter counts (without building the model) -----------------------------------------
    def _norm_params(self, dim: int) -> int:
        return 2 * dim if self.norm == "layernorm" else dim

    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        n = h * (q + 2 * kv) + q * h
        n += (q + 2 * kv) if self.qkv_bias else 0
        n += h if self.out_bias else 0
        n += 2 * self.head_dim if self.qk_norm else 0
        return n

    def dense_mlp_params(self, width: int | None = None) -> int:
        h, f = self.hidden_size, width or self.intermediate_size
        branches = 1 if self.mlp == "gelu" else 2
        n = h * f * branches + f * h
        return n + (f * branches + h if self.mlp_bias else 0)

    def moe_params(self, active: bool = False) -> int:
        e = self.num_experts_per_tok if active else self.n_routed_experts
        h, f = self.hidden_size, self.moe_intermediate_size
        routed = e * 3 * h * f
        shared = 3 * h * f * self.n_shared_experts
        return routed + shared + self.n_routed_experts * h      # + router weight

    def layer_params(self, i: int, active: bool = False) -> int:
        norms = (4 if self.residual == "sandwich" else 2) * self._norm_params(self.hidden_size)
        mlp = self.moe_params(active) if self.is_moe_layer(i) else self.dense_mlp_params()
        return self.attention_params() + mlp + norms

    def embedding_params(self) -> int:
        n = self.vocab_size * self.hidden_size
        if self.position_embedding == "learned_2d":
            n += 2 * self.max_position_embeddings * self.hidden_size
        return n

    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def num_params(self, active: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the model this config builds. active: MoE counts only the experts a token
        uses. exclude_embeddings: without the token/position embeddings and the (untied) output head."""
        n = sum(self.layer_params(i, active) for i in range(self.num_layers))
        n += self._norm_params(self.hidden_size)                 # final norm
        if not exclude_embeddings:
            n += self.embedding_params() + self.head_params()
        return n

    def _mlp_matmul_params(self, i: int) -> int:
        """Matmul weights one token runs through in layer i's MLP (MoE: the router, its top-k routed
        experts and the shared experts)."""
        h = self.hidden_size
        if self.is_moe_layer(i):
            experts = self.num_experts_per_tok + self.n_shared_experts
            return 3 * h * self.moe_intermediate_size * experts + self.n_routed_experts * h
        return ((1 if self.mlp == "gelu" else 2) + 1) * h * self.intermediate_size

    def matmul_params(self) -> int:
        """N of DESIGN.md §4's `6N`: active weights used in matrix multiplies per token, including the
        output projection (tied or not) and excluding embedding lookups, norms and biases."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h
        return sum(attn + self._mlp_matmul_params(i) for i in range(self.num_layers)) + self.vocab_size * h

    def loss_position_matmul_params(self) -> int:
        """The part of `matmul_params` that `GLM.loss` runs only at loss positions: the output
        projection and, when the last layer is dense, its MLP (hidden states are gathered at the loss
        positions right after the last attention; an MoE last layer runs everywhere)."""
        last = self.num_layers - 1
        mlp = 0 if self.is_moe_layer(last) else self._mlp_matmul_params(last)
        return self.vocab_size * self.hidden_size + mlp

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, `6N + 12·L·H·Q·T` (DESIGN.md §4): the textbook count, which
        projects every position to the vocabulary (what a causal LM does; see `training_flops` for
        what `GLM.loss` actually computes)."""
        return 6 * self.matmul_params() + 12 * self.num_layers * self.num_heads * self.head_dim * seq_len

    def training_flops(self, positions: int, loss_positions: int, seq_len: int) -> int:
        """FLOPs of one forward + backward of `GLM.loss` over `positions` positions in rows of `seq_len`
        (padding included: it is computed) of which `loss_positions` carry a loss: 6 FLOPs per matmul
        weight per position that runs it (2 forward, 4 backward), the output projection and the last
        dense MLP only at loss positions, and `12·L·H·Q·T` per position for the attention scores and
        their weighted sum (every query against every key of its row, as the dense-mask kernel
        computes it). For a CLM batch every position but the last of a row is a loss position, so
        this is close to `positions · flops_per_token(seq_len)`; for GLM (~15-50% loss positions) it
        is what keeps MFU honest."""
        at_loss = self.loss_position_matmul_params()
        everywhere = self.matmul_params() - at_loss
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6 * (everywhere * positions + at_loss * loss_positions) + attention * positions

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GLMConfig:
        d = {k: v for k, v in d.items() if k not in RUNTIME_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GlmkitError(f"unknown GLMConfig key {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                              + f"; known keys: {', '.join(sorted(known))}")
        return cls(**d).validate()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":             # a folder (the checkpoint's): write folder/config.json
            path.mkdir(parents=True, exist_ok=True)
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise GlmkitError(f"no config at {path}; expected a config.json written by GLMConfig.save")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GlmkitError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GLMConfig:
        if name not in PRESETS:
            raise GlmkitError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides).validate()

    def with_(self, **overrides) -> GLMConfig:
        return replace(self, **overrides).validate()


def _glm2021(name, h, layers, heads, **kw):
    return GLMConfig(name=name, vocab_size=30592, hidden_size=h, num_layers=layers, num_heads=heads,
                     intermediate_size=4 * h, norm="layernorm", norm_eps=1e-5, mlp="gelu", mlp_bias=True,
                     qkv_bias=True, out_bias=True, position_embedding="learned_2d",
                     max_position_embeddings=512, tie_word_embeddings=True, **kw)


def _glm4(name, h, layers, heads, kv, ffn, vocab=151552, **kw):
    # GLM-4 / ChatGLM2-3 (HF `Glm`): pre-RMSNorm, SwiGLU, GQA with qkv bias, interleaved RoPE on half the head
    kw = {"norm_eps": 1.5625e-07, "max_position_embeddings": 8192, "residual": "pre", **kw}
    return GLMConfig(name=name, vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, intermediate_size=ffn, norm="rmsnorm", mlp="swiglu",
                     qkv_bias=True, position_embedding="rope", rope_interleaved=True,
                     partial_rotary_factor=0.5, **kw)


def _glm45(name, h, layers, heads, kv, ffn, experts, moe_ffn, dense, scale, qk_norm, **kw):
    # GLM-4.5 / 4.6 (HF `Glm4Moe`); shapes from the released config.json files
    return GLMConfig(name=name, vocab_size=151552, hidden_size=h, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=128, intermediate_size=ffn, norm="rmsnorm", norm_eps=1e-5,
                     mlp="swiglu", qkv_bias=True, qk_norm=qk_norm, position_embedding="rope",
                     rope_interleaved=False, partial_rotary_factor=0.5, rope_theta=1e6,
                     n_routed_experts=experts, num_experts_per_tok=8, moe_intermediate_size=moe_ffn,
                     n_shared_experts=1, first_k_dense_replace=dense, routed_scaling_factor=scale,
                     norm_topk_prob=True, n_group=1, topk_group=1, **kw)


PRESETS: dict[str, GLMConfig] = {
    # tiny shapes for tests (one per family) and a small one for CPU benchmarks
    "tiny": _glm4("tiny", 64, 2, 4, 2, 128, vocab=128, norm_eps=1e-5, max_position_embeddings=256),
    "tiny-0414": _glm4("tiny-0414", 64, 2, 4, 2, 128, vocab=128, norm_eps=1e-5, residual="sandwich",
                       max_position_embeddings=256),
    "tiny-moe": replace(_glm45("tiny-moe", 64, 3, 4, 2, 128, 8, 32, 1, 2.5, True, max_position_embeddings=256),
                        vocab_size=128, head_dim=16, num_experts_per_tok=2, n_group=2, topk_group=1),
    "tiny-glm": replace(_glm2021("tiny-glm", 64, 2, 4), vocab_size=128, max_position_embeddings=256),
    "tiny-glm130b": GLMConfig(name="tiny-glm130b", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=96, norm="layernorm", residual="deepnorm", mlp="geglu",
                              mlp_bias=True, gelu_approximate="none", out_bias=True,
                              position_embedding="rope", rope_interleaved=False, partial_rotary_factor=1.0,
                              max_position_embeddings=256, tie_word_embeddings=True),
    "tiny-chatglm": GLMConfig(name="tiny-chatglm", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=256, norm="layernorm", residual="deepnorm", mlp="gelu",
                              mlp_bias=True, out_bias=True, position_embedding="rope_2d",
                              rope_interleaved=False, max_position_embeddings=256, tie_word_embeddings=True),
    "small": _glm4("small", 256, 4, 4, 2, 704, vocab=8192, norm_eps=1e-5, max_position_embeddings=2048),
    # GLM (2021), BERT-shaped: 110M / 335M
    "glm-base": _glm2021("glm-base", 768, 12, 12),
    "glm-large": _glm2021("glm-large", 1024, 24, 16),
    # GLM-130B: DeepNorm post-LN, GeGLU (exact GeLU), rotate-half RoPE, tied head
    "glm-130b": GLMConfig(name="glm-130b", vocab_size=150528, hidden_size=12288, num_layers=70, num_heads=96,
                          intermediate_size=32768, norm="layernorm", norm_eps=1e-5, residual="deepnorm",
                          mlp="geglu", mlp_bias=True, gelu_approximate="none", qkv_bias=True, out_bias=True,
                          position_embedding="rope", rope_interleaved=False, partial_rotary_factor=1.0,
                          max_position_embeddings=2048, tie_word_embeddings=True),
    # ChatGLM-6B: DeepNorm-style alpha, GeLU, 2D RoPE. Its config leaves tie_word_embeddings at the HF
    # default (True), which is how the published 6.2B parameters add up.
    "chatglm-6b": GLMConfig(name="chatglm-6b", vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32,
                            intermediate_size=16384, norm="layernorm", norm_eps=1e-5, residual="deepnorm",
                            mlp="gelu", mlp_bias=True, qkv_bias=True, out_bias=True,
                            position_embedding="rope_2d", rope_interleaved=False,
                            max_position_embeddings=2048, tie_word_embeddings=True),
    # GLM-4-9B (THUDM/glm-4-9b-hf) and GLM-4-9B-0414 (THUDM/GLM-4-9B-0414)
    "glm-4-9b": _glm4("glm-4-9b", 4096, 40, 32, 2, 13696, head_dim=128),
    "glm-4-9b-0414": _glm4("glm-4-9b-0414", 4096, 40, 32, 2, 13696, head_dim=128, residual="sandwich",
                           norm_eps=1e-5, max_position_embeddings=32768),
    # GLM-4.5 / GLM-4.5-Air / GLM-4.6 (zai-org/*): 355B-A32B, 106B-A12B, 355B-A32B
    "glm-4.5": _glm45("glm-4.5", 5120, 92, 96, 8, 12288, 160, 1536, 3, 2.5, True,
                      max_position_embeddings=131072),
    "glm-4.5-air": _glm45("glm-4.5-air", 4096, 46, 96, 8, 10944, 128, 1408, 1, 1.0, False,
                          max_position_embeddings=131072),
    "glm-4.6": _glm45("glm-4.6", 5120, 92, 96, 8, 12288, 160, 1536, 3, 2.5, True,
                      max_position_embeddings=202752),
    # DESIGN.md §4 benchmark shapes (GLM-4-shaped)
    "bench-338m": _glm4("bench-338m", 1024, 24, 16, 4, 2816, vocab=32768, norm_eps=1e-5,
                        max_position_embeddings=4096),
    "bench-1.9b": _glm4("bench-1.9b", 2048, 24, 16, 2, 6912, norm_eps=1e-5, max_position_embeddings=4096),
}


def human(n: int | float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) and not math.isclose(n, round(n)) else str(int(n))
