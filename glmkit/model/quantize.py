"""Weight-only quantization for inference: int8 (per output channel) and int4 (groups of 32) weights
for the linear layers of every family, MoE experts included.

    quantize(model, "int8")        # in place; returns the model. Activations stay in the model's dtype.

What is quantized: every `nn.Linear` inside the transformer blocks (fused qkv, o_proj, the dense MLP,
the shared experts) and the stacked routed experts (`Experts.gate_up_proj` (E, 2I, h), `down_proj`
(E, h, I)). What is not: the token embedding (a lookup, no matmul), the output head (kept in the
model's dtype, as GPTQ / AWQ / llama.cpp keep it: its error lands directly on the logits), norms,
biases, the MoE router (fp32, as it always is).

Schemes (symmetric, no zero points; scales in fp32):
- `int8`: per output row r, s_r = max|W_r| / 127, q = round(W / s_r) in [-127, 127], one byte per
  weight (+ 4 bytes per row): about half of bf16, a quarter of fp32.
- `int4`: per group of 32 consecutive input columns of a row, s = max|W_g| / 7, q in [-8, 7], two
  weights per byte (+ 4 bytes per 32 weights): about 0.31x bf16. A layer whose input width is not a
  multiple of 32 stays int8.

Matmul: `int8` on the CPU goes through torch's `_weight_int8pack_mm` (x @ (q · s)^T without
materialising the float weight); elsewhere, and for `int4`, the weight is dequantized to the
activation dtype inside the forward (one layer's float weight alive at a time) and multiplied with
`F.linear`. Routed experts dequantize only the experts that received tokens (the reference loop path
of `glmkit.model.moe`; the grouped matmul wants float weights).

Why not torchao (the PyTorch-native library; 0.18 on torch 2.13 here): its int8 weight-only config
works on `nn.Linear` on this CPU, but it does not quantize the stacked 3-D expert tensors of
glmkit's MoE (it requires a module with a `weight`), and its int4 needs the separate `mslk` kernel
package or CUDA; this file is ~150 lines that cover every family on any device the same way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmkit.errors import GlmkitError

SCHEMES = ("int8", "int4")
GROUP = 32                 # int4 group size (input columns sharing one scale)


class QuantizedWeight(nn.Module):
    """A (..., out, in) weight as int8 rows or packed int4 groups with fp32 scales. `dequantize(dtype)`
    returns the float weight; `w[e]` the float weight of expert e (3-D weights)."""

    def __init__(self, weight: torch.Tensor, scheme: str):
        super().__init__()
        w = weight.detach().float()
        self.shape, self.dtype = tuple(weight.shape), weight.dtype     # the float weight's (dequantize's default)
        self.scheme = "int4" if scheme == "int4" and w.shape[-1] % GROUP == 0 else "int8"
        if self.scheme == "int8":
            scale = w.abs().amax(-1).clamp_min(1e-12) / 127                        # (..., out)
            q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        else:
            g = w.unflatten(-1, (-1, GROUP))                                          # (..., out, in/32, 32)
            scale = g.abs().amax(-1).clamp_min(1e-12) / 7                            # (..., out, in/32)
            nib = (torch.round(g / scale[..., None]).clamp_(-8, 7) + 8).to(torch.uint8).flatten(-2)
            q = nib[..., 0::2] | (nib[..., 1::2] << 4)                               # (..., out, in/2)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.contiguous())

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.scheme == "int8":
            return (q.float() * scale[..., None]).to(dtype)
        nib = torch.stack((q & 15, q >> 4), -1).flatten(-2).float() - 8               # (..., out, in)
        return (nib.unflatten(-1, (-1, GROUP)) * scale[..., None]).flatten(-2).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._dequantize(self.qweight, self.scale, dtype or self.dtype)

    def __getitem__(self, e):
        return self._dequantize(self.qweight[e], self.scale[e], self.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale))


class QuantizedLinear(nn.Module):
    """`nn.Linear` with a `QuantizedWeight`; the bias stays in the activation dtype."""

    def __init__(self, linear: nn.Linear, scheme: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = QuantizedWeight(linear.weight, scheme)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.scheme == "int8" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), w.qweight, w.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.scheme}"


def _quantize_experts(experts: nn.Module, scheme: str) -> None:
    """Replace the stacked expert weights by quantized ones; the loop path dequantizes expert by expert."""
    for name in ("gate_up_proj", "down_proj"):
        q = QuantizedWeight(getattr(experts, name), scheme)
        delattr(experts, name)
        setattr(experts, name, q)
    experts.impl = "loop"


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize the weights of `model`'s blocks in place (see the module docstring); returns it."""
    from glmkit.model.moe import Experts

    if scheme not in SCHEMES:
        raise GlmkitError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    with torch.no_grad():
        for block in model.layers:
            for parent in list(block.modules()):
                if isinstance(parent, Experts):
                    _quantize_experts(parent, scheme)
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, QuantizedLinear(child, scheme))
    return model


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model` (quantized weights included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
