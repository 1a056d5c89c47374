"""GLM-4.5 / 4.6 mixture-of-experts feed-forward (HF `Glm4MoeMoE` numerics).

Per token x (after the post-attention norm):
    scores   = sigmoid(x @ W_router^T)                      in fp32 (router weight kept/cast to fp32)
    choice   = scores + e_score_correction_bias             only used to PICK experts
    (n_group > 1: only experts in the `topk_group` groups with the best top-2 sums are eligible)
    idx      = top-k(choice)                                k = num_experts_per_tok
    weights  = scores[idx] (/ their sum if norm_topk_prob) * routed_scaling_factor
    out      = sum_k weights_k * expert_{idx_k}(x) + shared_experts(x)
Each expert is a SwiGLU MLP; the weights are stored as HF stores them: `experts.gate_up_proj`
(E, 2I, h) with the gate first, `experts.down_proj` (E, h, I).

Balancing. GLM-4.5 trains aux-loss-free: the correction bias is nudged towards under-loaded experts.
`MoE.expert_load` accumulates how many tokens each expert received (training forward passes only);
`MoE.update_bias(rate)` (or `GLM.update_router_bias(rate)`) applies `bias += rate * sign(mean - load)`
and resets the counts: call it after each optimizer step when you want the bias to move; never call it
and the bias stays frozen (as loaded). `router_aux_loss_coef > 0` adds a switch-style balance loss
(`MoE.aux_loss`, summed by `GLM.loss`).

Expert compute paths (same routing, same arithmetic; picked on each call by a few host-side checks of the
device, dtype and shapes, no device work):
- `loop`     the REFERENCE: a Python loop over the experts that received tokens, one pair of matmuls
             each. Reads the per-expert counts on the host (`.tolist()`), so it syncs the device and
             cannot be captured by CUDA graphs or compiled without graph breaks.
- `grouped`  the (token, slot) assignments sorted by expert; `offs` (int32, the end row of each expert's
             run, computed on the device) drives two `torch._grouped_mm` calls over all experts. No
             Python loop over experts and no host sync: `torch.compile(fullgraph=True)` traces it.
             Needs `torch._grouped_mm`, fp32/bf16/fp16 on the CPU or bf16 on CUDA compute capability
             >= 9.0 (H100/H200), and hidden / moe_intermediate sizes whose rows are multiples of 16 bytes.
             Under torch.compile only bf16 (torch 2.13's meta kernel for grouped_mm accepts nothing else).
- `auto`     grouped where it is supported, else loop (the default). Under autocast the grouped path
             runs in autocast's dtype, as the loop's F.linear does (bf16 autocast on an H100/H200 takes
             the grouped path even though the residual stream reaching the experts is fp32).
Both paths scale each expert output by its routing weight (in fp32, rounded back to the activation
dtype) and add it into the token's output with `index_add_` in the activation dtype, in expert order (on
the CPU; CUDA's index_add_ adds atomically), so they agree to the rounding of the matmul kernels.
The path is a run-time choice, never part of the config: `model.set_runtime(moe_impl="loop")` (or
`set_moe_impl(model, impl)`) sets every layer's, `experts.impl = "loop"` one module's; the default is
`auto`. Forcing `grouped` where it cannot run raises `GlmkitError` with the reason.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmkit.errors import GlmkitError

IMPLS = ("auto", "loop", "grouped")


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) int64, like `torch.bincount(idx.flatten(), minlength=E)` but with a
    fixed output size, so it neither syncs nor breaks a compiled graph."""
    flat = idx.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


@functools.cache
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_unsupported(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> str | None:
    """Why the grouped path cannot run here, or None when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"grouped_mm on CUDA needs bfloat16 (got {dtype})"
        if _cuda_capability(device.index) < (9, 0):
            return f"grouped_mm on CUDA needs compute capability >= 9.0 (got {_cuda_capability(device.index)})"
    elif device.type != "cpu":
        return f"grouped_mm is not known to work on {device.type}"
    elif dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped_mm on the CPU needs fp32/bf16/fp16 (got {dtype})"
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return f"torch.compile traces grouped_mm in bfloat16 only (torch's meta kernel; got {dtype})"
    size = dtype.itemsize
    for name, n in (("hidden_size", hidden), ("moe_intermediate_size", inter)):
        if n * size % 16:
            return f"{name} = {n} rows of {dtype} are not a multiple of 16 bytes (grouped_mm's stride rule)"
    return None


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.n_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Stay fp32 through `model.to(bf16)` (HF keeps the router in fp32 too): routing is decided by
        small differences between scores."""
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x):
        """x (N, h) -> scores (N, E) fp32, top-k indices (N, k), top-k weights (N, k) fp32."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            N, G = x.shape[0], self.n_group
            group_scores = choice.view(N, G, -1).topk(2, dim=-1)[0].sum(-1)            # (N, G)
            keep = torch.zeros_like(group_scores).scatter_(
                1, group_scores.topk(self.topk_group, dim=-1, sorted=False)[1], 1.0)
            choice = choice.masked_fill(~keep.bool().repeat_interleave(self.n_experts // G, 1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, idx, weights * self.scaling


class Experts(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, h, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, h))
        self.down_proj = nn.Parameter(torch.empty(E, h, f))
        self.impl = "auto"          # a run-time choice: set_moe_impl / GLM.set_runtime

    def forward(self, x, idx, weights):
        """x (N, h), idx/weights (N, k) -> (N, h)."""
        if self.use_grouped(x):
            return self.forward_grouped(x, idx, weights)
        return self.forward_loop(x, idx, weights)

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.impl not in IMPLS:
            raise GlmkitError(f"unknown MoE impl {self.impl!r}; choose one of {', '.join(IMPLS)}")
        if self.impl == "loop":
            return False
        _, h, f = self.down_proj.shape
        why = grouped_unsupported(x.device, self.compute_dtype(x), h, f)
        if why is None and not (self.gate_up_proj.is_contiguous() and self.down_proj.is_contiguous()):
            why = "expert weights are not contiguous"
        if why is not None and self.impl == "grouped":
            raise GlmkitError(f"MoE impl 'grouped' cannot run: {why}; use 'auto' or 'loop'")
        return why is None

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the expert matmuls: autocast's when it is on (F.linear, in the loop, is cast by
        autocast; torch._grouped_mm is not, so the grouped path casts itself), else x's."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def forward_loop(self, x, idx, weights):
        """The reference. Loops over the experts that received tokens; each expert's output is scaled by
        its routing weight and added in expert order (as HF does)."""
        out = torch.zeros_like(x)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of = order // idx.shape[1]                      # token of each sorted assignment
        w_sorted = weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok, w = token_of[start:start + n], w_sorted[start:start + n]
            start += n
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * w[:, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def forward_grouped(self, x, idx, weights):
        """The loop's arithmetic with every expert in one grouped matmul per projection, no host sync.
        Rows are the N*k assignments sorted (stably) by expert; `offs[e]` is where expert e's run ends,
        so an expert with no tokens is an empty run."""
        E, k = self.gate_up_proj.shape[0], idx.shape[1]
        expert_sorted, order = idx.flatten().sort(stable=True)                            # (N*k,)
        ends = torch.arange(1, E + 1, device=idx.device, dtype=expert_sorted.dtype)
        offs = torch.searchsorted(expert_sorted, ends, out_int32=True)                  # (E,) cumulative counts
        token_of = order // k                                                             # (N*k,)
        dtype = self.compute_dtype(x)           # under autocast: cast as autocast casts F.linear's inputs
        xs = x.index_select(0, token_of).to(dtype)                                        # (N*k, h)
        w_gate_up, w_down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        # weights are (E, out, in); grouped_mm wants (E, in, out): the transposed view, no copy
        gate, up = torch._grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)  # (N*k, h)
        y = y * weights.flatten()[order][:, None]
        return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))


def set_moe_impl(model: nn.Module, impl: str) -> None:
    """Force the expert compute path of every MoE layer in `model`: auto | loop | grouped."""
    if impl not in IMPLS:
        raise GlmkitError(f"unknown MoE impl {impl!r}; choose one of {', '.join(IMPLS)}")
    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl


class SharedExperts(nn.Module):
    """The always-on expert(s): one SwiGLU MLP of width moe_intermediate_size * n_shared_experts."""

    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
        self.gate_up_proj = nn.Linear(h, 2 * f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = SharedExperts(config) if config.n_shared_experts > 0 else None
        self.aux_coef = config.router_aux_loss_coef
        self.aux_loss: torch.Tensor | None = None
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                   # (N, h)
        scores, idx, weights = self.gate(flat)
        out = self.experts(flat, idx, weights)
        if self.training:
            with torch.no_grad():
                self.expert_load += expert_counts(idx, self.expert_load.numel())
            self.aux_loss = self._balance_loss(scores, idx) if self.aux_coef > 0 else None
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _balance_loss(self, scores, idx):
        """Switch-style: E * sum_e (share of routed slots on e) * (mean normalised score of e)."""
        E, k = scores.shape[1], idx.shape[1]
        frac = expert_counts(idx, E).float() / (idx.shape[0] * k)
        prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
        return self.aux_coef * E * (frac * prob).sum()

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        load = self.expert_load      # all zero (nothing counted): sign(0) = 0 leaves the bias as it is
        self.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()
