"""Training steps (forward + backward + AdamW) of a glmkit model against the
equivalent HF transformers model, in the same run, on the same batch and the same weights
(`glmkit bench train`).

The peer is `Glm4ForCausalLM` (the glmkit model is built with sandwich norms to match it; `--hf-arch
glm` uses `GlmForCausalLM` and pre-norm instead; MoE presets use `Glm4MoeForCausalLM`). It gets the
GLM mask as the 4D additive float mask `glmkit.batch.float_mask` (built per step, as glmkit builds its
own mask per step), 1-D positions `position_ids + block_position_ids`, and computes its loss the way an
HF user would: full logits, cross-entropy over the loss positions. glmkit runs `model.loss(batch)`.

Batches come from the real objective code (`glmkit.data.packing.pack_documents` over random documents):
`--objective glm` ([MASK] spans, 15%), `clm`, or `both` (the glmkit model is also timed on causal
batches of the same shape: DESIGN.md §4's "GLM step vs causal step"). HF is timed on the first.

Rates: positions/s (all B*T row positions; the headline `*_tokens_per_s`), and for GLM the text
tokens/s (original document tokens) and loss tokens/s. MFU = the FLOPs each contestant performs per
step over its step time, over the matmul peak measured in this run (the best of several square sizes;
and, on known GPUs, over the data-sheet peak): glmkit projects to the vocabulary only at loss
positions (`GLMConfig.training_flops`), HF at every position (`flops_per_token(T)` per position).
`bench_train` returns the numbers as a dict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from glmkit.batch import Batch, float_mask
from glmkit.errors import GlmkitError
from glmkit.model.attention import check_flex_options
from glmkit.model.config import GLMConfig, human
from glmkit.train.metrics import datasheet_peak, measured_matmul_peak


@dataclass
class TrainBench:
    """What `bench_train` measures (the options of `glmkit bench train`); None: the device's default."""
    device: str | None = None           # cpu | cuda (default: cuda when available)
    dtype: str | None = None            # float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu)
    preset: str | None = None           # model preset (default: bench-338m on cuda, small on cpu)
    batch_size: int | None = None       # default: 16 on cuda, 4 on cpu
    seq_len: int | None = None          # default: 1024 on cuda, 256 on cpu
    steps: int | None = None            # timed steps per model (default: 20 cuda, 8 cpu)
    warmup: int | None = None           # untimed steps first (default: 5 cuda/compile, 1 cpu)
    compile: bool = False               # torch.compile both models (glmkit: per block)
    objective: str = "glm"              # glm | clm | both
    backend: str | None = None          # glmkit attention backend (default: auto)
    hf_arch: str = "glm4"               # glm4 (Glm4ForCausalLM, sandwich) | glm (GlmForCausalLM)
    no_hf: bool = False                 # time glmkit only (ratio null)
    seed: int = 0
    loop_steps: int = 10                # then time this many steps of the whole training loop (0: skip)
    attention_table: bool = False       # instead: fwd+bwd ms of each attention backend vs flash causal
    flex_options: list[str] = field(default_factory=list)   # Flex kernel options (JSON), see the cli help


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def make_batch(kind: str, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[Batch, dict]:
    """A batch from the objective code over random documents: one document piece per row."""
    from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
    from glmkit.data.packing import chunk_length, pack_documents

    if vocab < 64:
        raise GlmkitError(f"vocab_size {vocab} is too small for the benchmark's special tokens; use >= 64")
    special = SpecialIds(mask=vocab - 7, smask=vocab - 6, gmask=vocab - 5, sop=vocab - 4, eop=vocab - 3,
                         eot=vocab - 2, pad=vocab - 1, vocab_size=vocab)
    cfg = ObjectiveConfig(kind=kind)
    rng = np.random.default_rng(seed)
    n = chunk_length(cfg, seq_len)
    docs = [rng.integers(0, vocab - 8, n) for _ in range(batch_size)]
    res = pack_documents(docs, cfg, special, rng, batch_size, seq_len)
    s = res.stats
    if s.rows < batch_size or s.samples < batch_size:
        raise GlmkitError(f"could only fill {s.samples} of {batch_size} rows; try a longer --seq-len")
    return res.batch, {"text_tokens": s.text_tokens, "positions": batch_size * seq_len,
                       "processed": s.processed, "loss_tokens": s.loss_tokens}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def hf_model_like(model):
    """The HF transformers model with the same architecture and the same weights as `model`."""
    import transformers

    from glmkit.checkpoint.hf import config_to_hf, tensor_plan

    d = config_to_hf(model.config)
    arch = d.pop("architectures")[0]
    for k in ("model_type", "dtype"):
        d.pop(k, None)
    cfg_cls = {"GlmForCausalLM": transformers.GlmConfig, "Glm4ForCausalLM": transformers.Glm4Config,
               "Glm4MoeForCausalLM": transformers.Glm4MoeConfig}[arch]
    hf_cfg = cfg_cls(**{**d, "pad_token_id": None})     # no padding row: all ids are real tokens here
    hf = getattr(transformers, arch)._from_config(hf_cfg, attn_implementation="sdpa")
    ours, theirs = model.state_dict(), hf.state_dict()
    with torch.no_grad():
        for name, pieces in tensor_plan(model.config).items():
            for hf_name, index in pieces:
                theirs[hf_name].copy_(ours[name][index])
    return hf


def glm_loss(model, batch: Batch):
    """The loss in the model's own attention backend (`model.set_runtime`)."""
    return model.loss(batch, model.attention_mask(batch))


def hf_loss(hf, batch: Batch, causal: bool):
    mask = None if causal else float_mask(batch, hf.dtype)
    out = hf(input_ids=batch.input_ids, position_ids=batch.position_ids + batch.block_position_ids,
             attention_mask=mask, use_cache=False)
    labels = batch.targets.masked_fill(~batch.loss_mask, -100)
    return F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, n: int, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return time.perf_counter() - t0


def make_step(model, loss_fn):
    fused = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    first = []

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not first:
            first.append(float(loss.detach()))
    return step, first


def matmul_peak(device, dtype) -> float:
    """Measured matmul FLOP/s of this device in this dtype (the best of several square sizes)."""
    return measured_matmul_peak(device, dtype)


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------
def _defaults(args: TrainBench) -> TrainBench:
    """`args` with every None replaced by the device's default."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise GlmkitError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return replace(args, device=device, dtype=args.dtype or ("bfloat16" if cuda else "float32"),
                   preset=args.preset or ("bench-338m" if cuda else "small"),
                   batch_size=args.batch_size or (16 if cuda else 4), seq_len=args.seq_len or (1024 if cuda else 256),
                   steps=args.steps or (20 if cuda else 8),
                   warmup=args.warmup if args.warmup is not None else (5 if cuda or args.compile else 1))


def _glm_rows(B: int, T: int, part_a: float, device) -> Batch:
    """B rows, each one GLM sample: Part A of part_a * T tokens, then one causal Part B run."""
    a = int(part_a * T)
    col = np.arange(T)[None].repeat(B, 0)
    z = np.zeros((B, T), dtype=np.int64)
    return Batch(z, z, z.astype(bool), z, z, z, np.full((B, T), a), (col >= a).astype(np.int64)).to(device)


def attention_table(device, dtype, shapes=((16, 16, 1024), (4, 16, 4096)), parts=(0.9, 0.5),
                    flex_variants: list[str] = (), log: Callable[[str], None] | None = None) -> list[dict]:
    """fwd+bwd milliseconds of `attend` per backend on GLM rows, against flash causal attention (the
    DESIGN.md §4 kernel table). head dim 64, GQA off. Each JSON text in `flex_variants` adds a column:
    Flex with those kernel options. `log` gets each row as it is measured."""
    from glmkit.model.attention import attend, make_attention_mask

    log = log or (lambda line: None)

    rows = []
    for B, H, T in shapes:
        for part_a in parts:
            batch = _glm_rows(B, T, part_a, device)
            q, k, v = (torch.randn(B, T, H, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(B, T, H, 64, device=device, dtype=dtype)
            a, b = part_a, 1 - part_a
            row = {"shape": f"{B}x{H}x{T}", "part_a": part_a, "work_vs_causal": round((a * a + a * b + b * b / 2) / 0.5, 3)}
            for name in ("causal", "sdpa", "flex", "split", *(f"flex{v}" for v in flex_variants)):
                backend = "flex" if name.startswith("flex") else name
                try:
                    options = check_flex_options(name[4:] if name.startswith("flex{") else None)
                    mask = None if name == "causal" else make_attention_mask(batch, backend, dtype, options)
                except GlmkitError as e:          # split unavailable here
                    log(f"{name}: {e}")
                    row[name] = None
                    continue

                def fn(mask=mask, q=q, k=k, v=v, grad=grad):
                    return torch.autograd.grad(attend(q, k, v, mask), (q, k, v), grad)
                try:
                    for _ in range(3):
                        fn()
                except Exception as e:   # e.g. Flex has no CPU backward; a kernel option this card refuses
                    log(f"{name}: {type(e).__name__}: {str(e)[:100]}")
                    row[name] = None
                    continue
                ms = [1e3 * timed(fn, 1, device) for _ in range(10)]
                row[name] = round(statistics.median(ms), 3)
            rows.append(row)
            log("  ".join(f"{k} {v}" for k, v in row.items()))
    return rows


def bench_train(args: TrainBench, log: Callable[[str], None] | None = None) -> dict:
    """Training steps of glmkit and HF on the same batch and weights; returns the result dict (`glmkit
    bench train` prints it as its last line). `log` gets the human-readable lines."""
    from glmkit.model.glm import GLM

    log = log or (lambda line: None)
    args = _defaults(args)
    if args.attention_table:
        device = torch.device(args.device)
        shapes = ((16, 16, 1024), (4, 16, 4096)) if device.type == "cuda" else ((2, 4, 256),)
        for v in args.flex_options:              # bad JSON or an unknown option: say so before timing anything
            check_flex_options(v)
        rows = attention_table(device, getattr(torch, args.dtype), shapes, flex_variants=args.flex_options, log=log)
        g = rows[0]
        best = min(x for name, x in g.items() if name in ("sdpa", "split") or name.startswith("flex") if x)
        return {"device": args.device, "dtype": args.dtype, "rows": rows,
                "ratio": round(g["causal"] / best, 4)}   # causal ms / best GLM-mask ms, first row
    if len(args.flex_options) > 1:
        raise GlmkitError("give one --flex-options for a training bench (several are for --attention-table)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    config = GLMConfig.from_name(args.preset)
    if args.seq_len > config.max_position_embeddings:
        raise GlmkitError(f"--seq-len {args.seq_len} exceeds the preset's max_position_embeddings "
                          f"{config.max_position_embeddings}")
    if not config.is_moe and args.hf_arch == "glm4":
        config = config.with_(residual="sandwich")          # = Glm4ForCausalLM
    model = GLM(config).to(device=device, dtype=dtype)
    model.set_runtime(attention_backend=args.backend or "auto", flex_options=(args.flex_options or [""])[0])
    hf = None if args.no_hf else hf_model_like(model).to(device=device, dtype=dtype)

    kinds = {"glm": ["glm"], "clm": ["clm"], "both": ["glm", "clm"]}[args.objective]
    batches = {}
    for k in kinds:
        b, counts = make_batch(k, args.batch_size, args.seq_len, config.vocab_size, args.seed)
        batches[k] = (b.to(device), counts)
    main_batch, counts = batches[kinds[0]]
    # FLOPs of one step as each contestant computes it (glmkit: the vocabulary only at loss positions)
    positions = args.batch_size * args.seq_len
    flops = {"glmkit": config.training_flops(positions, counts["loss_tokens"], args.seq_len),
             "hf": config.flops_per_token(args.seq_len) * positions}
    if "clm" in batches:
        flops["glmkit_clm"] = config.training_flops(positions, batches["clm"][1]["loss_tokens"], args.seq_len)
    resolved = model.attention_mask(main_batch).backend     # what glmkit really runs (incl. no mask)

    if args.compile:
        for block in model.layers:
            block.compile()
        if hf is not None:
            hf = torch.compile(hf)

    contestants = {"glmkit": make_step(model, lambda: glm_loss(model, main_batch))}
    if "clm" in batches and len(kinds) == 2:
        clm_batch = batches["clm"][0]
        contestants["glmkit_clm"] = make_step(model, lambda: glm_loss(model, clm_batch))
    if hf is not None:
        contestants["hf"] = make_step(hf, lambda: hf_loss(hf, main_batch, kinds[0] == "clm"))

    log(f"glmkit bench train: {config.name} ({human(model.num_params())} params, "
        f"{human(config.flops_per_token(args.seq_len))} FLOP/token) on {args.device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"{args.dtype}, batch {args.batch_size} x {args.seq_len}, objective {args.objective}, "
        f"attention {resolved}, compile {args.compile}")
    log(f"batch: {counts['text_tokens']} text tokens -> {counts['processed']} processed positions "
        f"(+{counts['positions'] - counts['processed']} padding), {counts['loss_tokens']} loss tokens")
    for step, _ in contestants.values():
        timed(step, args.warmup, device)
    times = {name: [] for name in contestants}
    for _ in range(args.steps):           # interleave single steps, take medians: robust to a busy machine
        for name, (step, _) in contestants.items():
            times[name].append(timed(step, 1, device))
    seconds = {name: statistics.median(t) for name, t in times.items()}       # per step
    return _report(args, config, device, dtype, contestants, seconds, counts, resolved, log, flops)


def _report(args, config, device, dtype, contestants, seconds, counts, resolved, log, flops) -> dict:
    rate = {n: counts["positions"] / s for n, s in seconds.items()}
    peak = matmul_peak(device, dtype)
    sheet = datasheet_peak(device)
    mfu = {n: flops[n] / s / peak for n, s in seconds.items()}
    for name, r in rate.items():
        first = contestants[name][1]
        log(f"{name:>11}: {r:12,.0f} positions/s  {1e3 * seconds[name]:8.1f} ms/step (median)  "
            f"MFU {100 * mfu[name]:5.1f}% of measured peak  first loss {first[0]:.4f}")
    g = rate["glmkit"]
    scale = lambda key: g * counts[key] / counts["positions"]
    log(f"glmkit GLM rates: {scale('text_tokens'):,.0f} text tokens/s, {scale('processed'):,.0f} processed "
        f"positions/s, {scale('loss_tokens'):,.0f} loss tokens/s")
    ratio = g / rate["hf"] if "hf" in rate else None
    out = {"glmkit_tokens_per_s": round(g, 1), "hf_tokens_per_s": round(rate["hf"], 1) if "hf" in rate else None,
           "ratio": round(ratio, 4) if ratio else None, "mfu": round(mfu["glmkit"], 4),
           "mfu_datasheet": round(mfu["glmkit"] * peak / sheet, 4) if sheet else None,
           "hf_mfu": round(mfu["hf"], 4) if "hf" in rate else None,
           "peak_tflops_measured": round(peak / 1e12, 2), "peak_tflops_datasheet": sheet / 1e12 if sheet else None,
           "device": args.device, "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "dtype": args.dtype, "preset": config.name, "objective": args.objective, "attention": resolved,
           "compile": args.compile, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
           "text_tokens_per_s": round(scale("text_tokens"), 1), "processed_per_s": round(scale("processed"), 1),
           "loss_tokens_per_s": round(scale("loss_tokens"), 1),
           "first_loss": {n: round(c[1][0], 5) for n, c in contestants.items()}}
    if "glmkit_clm" in rate:
        out["glmkit_clm_tokens_per_s"] = round(rate["glmkit_clm"], 1)
        out["glm_vs_clm"] = round(g / rate["glmkit_clm"], 4)
        log(f"GLM objective vs causal on the same glmkit model: {out['glm_vs_clm']:.3f}x")
    if ratio:
        log(f"ratio glmkit / HF: {ratio:.3f}x")
    if args.loop_steps > 0:
        out.update(_loop_share(args, config, log))
    return out


def _loop_share(args, config, log) -> dict:
    """The whole `glmkit train` loop (default corpus, its tokenizer's vocabulary, data iterator and
    prefetch, AdamW, the GLM-Large objective) for `--loop-steps` steps: how much of a step waits for data."""
    from glmkit.train.loop import TrainConfig, measure_data_share
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(args.dtype, "auto")
    cfg = TrainConfig(model=config.name, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                      dtype=dtype, compile=args.compile, objective="glm", progress=False, tensorboard=False,
                      attention_backend=args.backend or "auto", flex_options=(args.flex_options or [""])[0])
    r = measure_data_share(cfg, steps=args.loop_steps)
    log(f"whole training loop ({args.loop_steps} steps, default corpus): {r['tok_per_s']:,.0f} positions/s, "
        f"data pipeline {100 * r['data_share']:.2f}% of step time")
    return {"loop_tokens_per_s": round(r["tok_per_s"], 1), "data_share": round(r["data_share"], 5)}
