"""`glmkit train`: pretrain a GLM with blank infilling (or MLM / CLM) on a corpus; exact resume.

    glmkit train --model small --objective glm --max-steps 2000 --out-dir runs/small
    torchrun --nproc_per_node 2 -m glmkit train --parallel fsdp ...      # DDP by default under torchrun

One optimizer step: every process takes `grad_accum` micro-batches of `batch_size` rows of `seq_len`
tokens from its data shards, runs forward/backward on each (gradients synchronised on the last one
only), clips the global gradient norm, and steps AdamW under a warmup + cosine schedule.

The loss is the mean cross-entropy over *all* loss positions of the global batch (every micro-batch
of every rank), not a mean of per-micro-batch means: GLM rows carry different numbers of loss tokens,
and weighting by them makes a 2-process step equal to a 1-process step over the same rows.

Data: the run has `data_shards` independent data streams (default: the number of processes).
Process r owns shards r, r + world, ... and its k-th micro-batch (counted over the run) comes from its
(k mod owned)-th shard. So the same rows reach the model whatever the number of processes: a 1-process
run with `--data-shards 2 --grad-accum 2` takes exactly the steps of a 2-process run, and a run can
resume on another number of processes if `--data-shards` stays the same.

Resume is exact: a checkpoint holds the weights, optimizer and scheduler state, the RNG states and
each data shard's iterator state, so a resumed run logs the same losses as an uninterrupted one (bit
for bit on the CPU). Ctrl-C / SIGTERM finish the current step, save, and exit.

The options are the fields of `TrainConfig`; their comments are the `--help` text.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import inspect
import json
import math
import os
import queue
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from glmkit import checkpoint as ckpt_io
from glmkit import distributed as D
from glmkit.errors import GlmkitError
from glmkit.metrics import MetricsLogger, Progress, measured_matmul_peak, peak_flops


@dataclass
class TrainConfig:
    out_dir: str = "runs/glm"
    """run directory: metrics.jsonl, train_config.json, checkpoints/"""
    model: str = "small"
    """model preset name (see glmkit.config PRESETS) or a config.json path"""
    model_overrides: str = ""
    """comma-separated GLMConfig overrides, e.g. 'hidden_size=128,num_layers=2'"""
    corpus: str | None = None
    """corpus directory (default: the default bilingual corpus in data/default, built on first use)"""
    objective: str = "glm"
    """glm | mlm | clm, or an objective preset (glm-large, glm-10b, glm-130b, bert, gpt)"""
    mixture: str | None = None
    """GLM mask mixture P([MASK]),P([sMASK]),P([gMASK]), e.g. '0.5,0.3,0.2' (default: the preset's)"""
    seq_len: int = 256
    """tokens per row"""
    batch_size: int = 16
    """rows per micro-batch per process"""
    grad_accum: int = 1
    """micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)"""
    data_shards: int | None = None
    """independent data streams (default: the number of processes); keep it fixed to resume a run on a
    different number of processes"""
    max_steps: int = 1000
    """optimizer steps"""
    lr: float = 2e-4
    """peak learning rate (GLM-Large: 2e-4)"""
    min_lr_ratio: float = 0.05
    """the cosine decays to lr x this (GLM-Large: 0.05)"""
    warmup_steps: int | None = None
    """linear warmup steps (default: 5% of max_steps, as GLM-Large)"""
    weight_decay: float = 0.1
    """decoupled (AdamW) weight decay; never applied to norms, biases or embeddings"""
    beta1: float = 0.9
    """Adam beta1"""
    beta2: float = 0.98
    """Adam beta2 (GLM-Large: 0.98)"""
    eps: float = 1e-6
    """Adam epsilon (GLM-Large: 1e-6)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    seed: int = 1234
    """seed of the model init and of the data streams"""
    device: str = "auto"
    """auto | cpu | cuda"""
    dtype: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16"""
    compile: bool = False
    """torch.compile each transformer block"""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward (less memory, ~30% more compute)"""
    parallel: str = "auto"
    """auto (DDP under torchrun) | none | ddp | fsdp (FSDP2 fully_shard per block)"""
    eval_every: int = 100
    """validation loss every N steps (0: never)"""
    eval_batches: int = 8
    """fixed validation micro-batches from the val split"""
    save_every: int = 200
    """checkpoint every N steps, and at the end (0: never, not even at the end or on Ctrl-C)"""
    keep: int = 3
    """checkpoints kept (the newest)"""
    prefetch: int = 2
    """steps of batches prepared ahead in a background thread (0: build them in the loop)"""
    progress: bool = True
    """show a progress bar"""
    tensorboard: bool = True
    """also write TensorBoard events when tensorboard is installed"""
    router_bias_rate: float = 1e-3
    """MoE models: after each step move every router's correction bias by this much towards balance
    (GLM-4.5's aux-loss-free balancing; 0: frozen)"""
    resume: bool = False
    """continue the run in out_dir from its latest checkpoint (start fresh if it has none)"""
    overwrite: bool = False
    """delete the run already in out_dir and start over"""

    def validate(self) -> TrainConfig:
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise GlmkitError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        checks = [(self.dtype in ("auto", "fp32", "bf16"), "--dtype must be auto, fp32 or bf16"),
                  (self.parallel in D.MODES, f"--parallel must be one of {', '.join(D.MODES)}"),
                  (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
                  (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
                  (self.data_shards is None or self.data_shards > 0, "--data-shards must be positive")]
        for ok, msg in checks:
            if not ok:
                raise GlmkitError(msg)
        return self

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.05 * self.max_steps))


# fields a resumed run must share with its checkpoint (the rest: schedule length, logging, saving, speed)
MUST_MATCH = ("seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
              "beta1", "beta2", "eps", "grad_clip", "seed", "router_bias_rate")


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to
    `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------ building

def build_model_config(cfg: TrainConfig, tokenizer):
    from glmkit.config import GLMConfig
    is_file = cfg.model.endswith(".json") or os.path.isdir(cfg.model)
    config = GLMConfig.load(cfg.model) if is_file else GLMConfig.from_name(cfg.model)
    overrides = {}
    for item in filter(None, (s.strip() for s in cfg.model_overrides.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise GlmkitError(f"--model-overrides item {item!r} is not key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except ValueError:
            overrides[key.strip()] = value
    if is_file and config.vocab_size < tokenizer.vocab_size:
        raise GlmkitError(f"{cfg.model} has vocab_size {config.vocab_size} but the corpus tokenizer has "
                          f"{tokenizer.vocab_size} tokens; raise vocab_size in the config")
    if not is_file:  # presets take the corpus tokenizer's vocabulary
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
    overrides.setdefault("max_position_embeddings", max(config.max_position_embeddings, cfg.seq_len))
    return config.with_(**overrides)


def build_objective(cfg: TrainConfig):
    from glmkit.objectives import PRESETS, ObjectiveConfig
    names = {"glm": "glm-large", "mlm": "bert", "clm": "gpt"}
    name = names.get(cfg.objective, cfg.objective)
    if name not in PRESETS:
        raise GlmkitError(f"unknown --objective {cfg.objective!r}; use glm, mlm, clm or one of {', '.join(PRESETS)}")
    objective = ObjectiveConfig.from_name(name)
    if cfg.mixture:
        if objective.kind != "glm":
            raise GlmkitError("--mixture applies to the glm objective only")
        try:
            mix = tuple(float(x) for x in cfg.mixture.split(","))
        except ValueError:
            raise GlmkitError(f"--mixture {cfg.mixture!r} is not three comma-separated numbers") from None
        objective = ObjectiveConfig(**{**objective.to_dict(), "mixture": mix})
    return objective


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not norms, biases or embeddings (a tied head is the embedding)."""
    no_decay = set()
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
    decay, rest = [], []
    for p in module.parameters():
        if p.requires_grad:
            (rest if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Prefetcher:
    """Yields one step's micro-batches at a time, built `depth` steps ahead in a daemon thread.

    Each item carries the data-iterator states *after* its batches were drawn, so a checkpoint stores
    exactly where the consumed stream stands, not where the read-ahead got to.
    """

    def __init__(self, iterators: dict[int, object], grad_accum: int, start_micro: int, depth: int):
        self.its, self.grad_accum, self.micro = iterators, grad_accum, start_micro
        self.order = sorted(iterators)
        self.depth, self.stop = depth, threading.Event()
        if depth > 0:
            self.queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._run, daemon=True, name="glmkit-data")
            self.thread.start()

    def _make(self):
        batches = []
        for _ in range(self.grad_accum):
            batches.append(next(self.its[self.order[self.micro % len(self.order)]]))
            self.micro += 1
        return batches, {s: copy.deepcopy(it.state_dict()) for s, it in self.its.items()}

    def _run(self):
        try:
            while not self.stop.is_set():
                item = self._make()
                while not self.stop.is_set():
                    with contextlib.suppress(queue.Full):
                        self.queue.put(item, timeout=0.1)
                        break
        except BaseException as e:  # hand the error to the training thread
            self.queue.put(e)

    def next(self):
        if self.depth == 0:
            return self._make()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()


# ------------------------------------------------------------------------------------------ the run

@dataclass
class Run:
    """Everything one training process holds."""
    cfg: TrainConfig
    info: D.DistInfo
    run_dir: Path
    tokenizer: object
    model_config: object
    objective: object
    module: torch.nn.Module              # parallelize(model): call module(batch) -> loss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    iterators: dict                      # data shard index -> BatchIterator (this process's shards)
    val_batches: list                    # this process's fixed validation micro-batches (numpy)
    fingerprint: dict
    data_shards: int
    step: int = 0
    tokens: int = 0                      # processed positions (rows x seq_len) so far, all processes
    data_states: dict | None = None      # iterator states after the last consumed step

    @property
    def model(self) -> torch.nn.Module:
        return D.unwrap(self.module)

    @property
    def compute_dtype(self) -> torch.dtype:
        dtype = self.cfg.dtype
        if dtype == "auto":
            dtype = "bf16" if self.info.device.type == "cuda" else "fp32"
        return torch.bfloat16 if dtype == "bf16" else torch.float32

    @property
    def autocast(self):
        """bf16 autocast (weights and optimizer stay fp32), or nothing for fp32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16)


def _on_main(info: D.DistInfo, fn):
    """Run `fn` on rank 0 only; every rank gets its result or raises its GlmkitError (no hang)."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except GlmkitError as e:
            error = str(e)
    result, error = D.broadcast_object((result, error))
    if error is not None:
        raise GlmkitError(error)
    return result


def _open_corpus(cfg: TrainConfig):
    from glmkit.corpus import Corpus, default_corpus
    if cfg.corpus is None:
        return default_corpus(progress=cfg.progress)  # builds data/default on first use (file-locked)
    if not Path(cfg.corpus).is_dir():
        raise GlmkitError(f"--corpus {cfg.corpus} is not a directory; build one with `glmkit corpus build` "
                          f"or leave --corpus out for the default corpus")
    return Corpus.open(cfg.corpus)


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, fingerprint: dict) -> Path | None:
    """Check out_dir against --resume / --overwrite; returns the checkpoint to resume from, if any."""
    saved = run_dir / "train_config.json"
    holds_run = saved.is_file() or (run_dir / "checkpoints").is_dir()
    if holds_run and not (cfg.resume or cfg.overwrite):
        differs = ""
        if saved.is_file():
            old = json.loads(saved.read_text()).get("fingerprint", {})
            diff = _fingerprint_diff(old, fingerprint)
            differs = f" with a different configuration ({diff})" if diff else ""
        raise GlmkitError(f"{run_dir} already holds a training run{differs}; pass --resume to continue it, "
                          f"--overwrite to delete it and start over, or choose another --out-dir")
    if cfg.overwrite:
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "train_config.json"):
            (run_dir / name).unlink(missing_ok=True)
    found = ckpt_io.latest_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    if found is not None:
        manifest = ckpt_io.verify(found)
        diff = _fingerprint_diff(manifest["fingerprint"], fingerprint)
        if diff:
            raise GlmkitError(f"cannot resume from {found}: it was trained with a different setup ({diff}); "
                              f"use the same options, or --overwrite / another --out-dir to start a new run")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"train_config": asdict(cfg), "fingerprint": fingerprint}
    (run_dir / "train_config.json").write_text(json.dumps(record, indent=1) + "\n")
    return found


def _fingerprint_diff(old: dict, new: dict) -> str:
    out = []
    for part in ("tokenizer", "model", "objective", "train", "data_shards"):
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out += [f"{part}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4]]
        elif part == "tokenizer":
            out.append(f"tokenizer hash {str(a)[:12]} -> {str(b)[:12]} (the corpus was built with another "
                       f"tokenizer)")
        else:
            out.append(f"{part}: {a!r} -> {b!r}")
    return "; ".join(out)


def _val_batches(cfg: TrainConfig, corpus, objective, specials, info: D.DistInfo) -> list:
    """A fixed validation set: `eval_batches` micro-batches from one stream (the same whatever the
    number of processes); process r evaluates batches r, r + world, ..."""
    from glmkit.data import BatchIterator
    docs = corpus.documents("val")
    if cfg.eval_every <= 0 or not docs:
        return []
    it = BatchIterator(docs, objective, specials, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1,
                       rank=0, world_size=1)
    # every rank must run the same number of forwards (FSDP2 gathers parameters in each)
    n = -(-cfg.eval_batches // info.world_size) * info.world_size
    batches = [next(it) for _ in range(n)]
    return batches[info.rank::info.world_size]


def setup(cfg: TrainConfig) -> tuple[Run, Path | None]:
    from glmkit.data import BatchIterator
    from glmkit.model import GLM
    from glmkit.objectives import SpecialIds

    cfg.validate()
    info = D.init(cfg.device)
    run_dir = Path(cfg.out_dir)
    if info.enabled:  # rank 0 builds the default corpus if needed (or fails for all); then every rank opens it
        _on_main(info, lambda: [_open_corpus(cfg), None][1])
    corpus = _open_corpus(cfg)
    tokenizer = corpus.tokenizer
    model_config = build_model_config(cfg, tokenizer)
    objective = build_objective(cfg)
    specials = SpecialIds.from_tokenizer(tokenizer)
    objective.check(specials)
    data_shards = cfg.data_shards or info.world_size
    if data_shards % info.world_size:
        raise GlmkitError(f"--data-shards {data_shards} must be a multiple of the {info.world_size} processes")
    fingerprint = {"tokenizer": tokenizer.hash, "model": model_config.to_dict(), "objective": objective.to_dict(),
                   "train": {k: getattr(cfg, k) for k in MUST_MATCH}, "data_shards": data_shards}
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from a manifest (tuples -> lists)
    resume_from = _on_main(info, lambda: _prepare_run_dir(cfg, run_dir, fingerprint))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 does not broadcast)
    model = GLM(model_config).to(info.device)
    module = D.parallelize(model, info, cfg.parallel, cfg.compile, cfg.activation_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    warmup = cfg.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, cfg.max_steps, cfg.min_lr_ratio))
    train_docs = corpus.documents("train")
    if not train_docs:
        raise GlmkitError(f"the corpus at {corpus.directory} has no training documents")
    iterators = {s: BatchIterator(train_docs, objective, specials, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                  rank=s, world_size=data_shards)
                 for s in range(info.rank, data_shards, info.world_size)}
    run = Run(cfg, info, run_dir, tokenizer, model_config, objective, module, optimizer, scheduler, iterators,
              _val_batches(cfg, corpus, objective, specials, info), fingerprint, data_shards)
    return run, resume_from


# ------------------------------------------------------------------------------------------ one step

def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or any(
        s in text for s in ("can't allocate memory", "not enough memory", "out of memory"))


def train_step(run: Run, batches: list, stop_requested: bool = False) -> dict:
    """Forward/backward over this process's micro-batches, then one optimizer step.

    Returns {"loss", "lr", "grad_norm", "stop"}: `loss` is the global token-weighted mean; `stop` is
    True when any process was asked to stop (all ranks see the same value). Raises GlmkitError on a
    non-finite loss or gradient norm, without touching the weights.
    """
    dev, world = run.info.device, run.info.world_size
    counts = [int(b.loss_mask.sum()) for b in batches]
    n_global = D.all_reduce_sum(torch.tensor([float(sum(counts))], dtype=torch.float64, device=dev)).item()
    if n_global == 0:
        raise GlmkitError(f"step {run.step + 1}: the batch has no loss positions; check the corpus and objective")
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for i, (batch, n) in enumerate(zip(batches, counts)):
        batch = batch.to(dev, non_blocking=True)
        with D.gradient_sync(run.module, enabled=i == len(batches) - 1):
            with run.autocast:
                loss = run.module(batch)
            # DDP / FSDP2 average gradients over ranks: scale so the result is sum(loss * n) / n_global
            (loss.float() * (n * world / n_global)).backward()
        loss_sum += loss.detach().double() * n
    totals = D.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(stop_requested), dtype=torch.float64,
                                                                    device=dev)]))
    loss_value = totals[0].item() / n_global
    grad_norm = D.clip_grad_norm(run.module, run.cfg.grad_clip)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_norm}"
        raise GlmkitError(f"non-finite {what} at step {run.step + 1}; stopped without updating the weights or "
                          f"saving. The last good checkpoint is kept in {run.run_dir / 'checkpoints'}; lower "
                          f"--lr, raise --warmup-steps or use --dtype fp32, then --resume")
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    moe = run.model.moe_layers() if hasattr(run.model, "moe_layers") else []
    if moe and run.cfg.router_bias_rate > 0:
        for m in moe:  # every rank applies the same update: from the load counted on all ranks
            D.all_reduce_sum(m.expert_load)
        run.model.update_router_bias(run.cfg.router_bias_rate)
    return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "stop": totals[1].item() > 0}


def evaluate(run: Run) -> float | None:
    """Token-weighted mean loss over the fixed validation batches of all processes."""
    if not run.val_batches:
        return None
    dev = run.info.device
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    run.module.eval()
    with torch.no_grad():
        for batch in run.val_batches:
            n = int(batch.loss_mask.sum())
            with run.autocast:
                loss = run.module(batch.to(dev))
            sums += torch.stack([loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=dev)])
    run.module.train()
    sums = D.all_reduce_sum(sums)
    return (sums[0] / sums[1]).item()


# ------------------------------------------------------------------------------------------ save / load

def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(run: Run) -> Path:
    """Checkpoint the current step (a collective: every process must call it)."""
    model_state = D.model_state_dict(run.module)
    optim_state = D.optimizer_state_dict(run.module, run.optimizer)
    rng = D.all_gather_object(_rng_state(run.info.device))
    data = {}
    for part in D.all_gather_object(run.data_states):
        data.update(part)
    train_state = {"step": run.step, "tokens": run.tokens, "optimizer": optim_state,
                   "scheduler": run.scheduler.state_dict(), "rng": rng, "data": data,
                   "train_config": asdict(run.cfg), "world_size": run.info.world_size}

    def write():
        return ckpt_io.save_checkpoint(
            run.run_dir / "checkpoints", run.step, model_state=model_state,
            save_config=run.model_config.save, save_tokenizer=lambda p: run.tokenizer.save(p.parent),
            train_state=train_state, fingerprint=run.fingerprint, keep=run.cfg.keep)

    return Path(_on_main(run.info, lambda: str(write())))


def restore(run: Run, path: Path) -> None:
    """Load a checkpoint verified by `_prepare_run_dir` into every process."""
    ck = ckpt_io.load_checkpoint(path, verify_files=False)
    ts = ck.train_state
    D.load_model_state_dict(run.module, ck.model_state)
    D.load_optimizer_state_dict(run.module, run.optimizer, ts["optimizer"])
    run.scheduler.load_state_dict(ts["scheduler"])
    missing = [s for s in run.iterators if s not in ts["data"]]
    if missing:
        raise GlmkitError(f"{path} has no state for data shard(s) {missing}; resume with --data-shards "
                          f"{len(ts['data'])}")
    for s, it in run.iterators.items():
        it.load_state_dict(ts["data"][s])
    rng = ts["rng"]
    _set_rng_state(rng[run.info.rank] if len(rng) == run.info.world_size else rng[0], run.info.device)
    run.step, run.tokens = int(ts["step"]), int(ts["tokens"])
    run.data_states = {s: ts["data"][s] for s in run.iterators}


# ------------------------------------------------------------------------------------------ the loop

class _StopSignal:
    """Ctrl-C / SIGTERM ask the loop to finish its step, save and exit; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested, self.old = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the final metrics (step, loss, val_loss, tokens, tok_per_s, mfu,
    data_share, checkpoint, interrupted, ...). Raises GlmkitError on bad input."""
    run, resume_from = setup(cfg)
    if resume_from is not None:
        restore(run, resume_from)
    return _loop(run, resumed=resume_from is not None)


def _loop(run: Run, resumed: bool) -> dict:
    cfg, info = run.cfg, run.info
    logger = MetricsLogger(run.run_dir, enabled=info.is_main, resume_step=run.step if resumed else None,
                           tensorboard=cfg.tensorboard)
    model = run.model
    flops_per_token = (getattr(model, "flops_per_token", None) or run.model_config.flops_per_token)(cfg.seq_len)
    peak, peak_basis = peak_flops(info.device, run.compute_dtype)
    # on a GPU, MFU against the data sheet and against a measured matmul peak (DESIGN.md section 4)
    measured = measured_matmul_peak(info.device, run.compute_dtype, n=8192, iters=10) \
        if info.device.type == "cuda" else peak
    positions = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size   # per optimizer step
    run.data_states = run.data_states or {s: copy.deepcopy(it.state_dict()) for s, it in run.iterators.items()}
    prefetch = Prefetcher(run.iterators, cfg.grad_accum, run.step * cfg.grad_accum, cfg.prefetch)
    progress = Progress(cfg.max_steps, run.step, enabled=cfg.progress and info.is_main)
    if not resumed:
        logger.log({"kind": "event", "step": 0, "event": "start", "num_params": model.num_params(),
                    "flops_per_token": flops_per_token, "peak_flops": peak, "peak_basis": peak_basis,
                    "measured_peak_flops": measured,
                    "world_size": info.world_size, "parallel": D.mode_of(run.module)})
    if info.is_main:
        progress.write(f"{run.model_config.name}: {model.num_params():,} parameters, {positions:,} positions "
                       f"per step on {info.world_size} x {info.device.type} ({D.mode_of(run.module)}); "
                       f"MFU against the {peak_basis} ({peak / 1e12:.3g} TFLOP/s)")
    stop = _StopSignal()
    out = {"run_dir": str(run.run_dir), "step": run.step, "loss": None, "val_loss": None, "interrupted": False,
           "checkpoint": None, "mfu_basis": peak_basis, "num_params": model.num_params()}
    timings, last_saved = [], run.step if resumed else -1
    try:
        while run.step < cfg.max_steps:
            t0 = time.perf_counter()
            batches, states = prefetch.next()
            t_data = time.perf_counter() - t0
            try:
                res = train_step(run, batches, stop.requested)
            except RuntimeError as e:
                if _is_oom(e):
                    raise GlmkitError(
                        f"step {run.step + 1}: a micro-batch of {cfg.batch_size} x {cfg.seq_len} tokens does "
                        f"not fit in {info.device.type} memory; use a smaller --batch-size (e.g. "
                        f"{max(1, cfg.batch_size // 2)}) with more --grad-accum (e.g. {cfg.grad_accum * 2}) "
                        f"for the same global batch, --activation-checkpointing, or a shorter --seq-len") from None
                raise
            t_step = time.perf_counter() - t0
            run.step, run.tokens, run.data_states = run.step + 1, run.tokens + positions, states
            timings.append((t_data, t_step))
            tok_s = positions / t_step
            mfu = flops_per_token * tok_s / (peak * info.world_size)
            logger.log({"kind": "train", "step": run.step, "loss": res["loss"], "lr": res["lr"],
                        "grad_norm": res["grad_norm"], "tokens": run.tokens, "tok_per_s": tok_s, "mfu": mfu,
                        "data_s": t_data, "step_s": t_step})
            progress.update(1, loss=f"{res['loss']:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
            out.update(step=run.step, loss=res["loss"])
            if cfg.eval_every > 0 and run.step % cfg.eval_every == 0 and run.val_batches:
                out["val_loss"] = evaluate(run)
                logger.log({"kind": "val", "step": run.step, "val_loss": out["val_loss"]})
                progress.write(f"step {run.step}: val loss {out['val_loss']:.4f}")
            if cfg.save_every > 0 and (run.step % cfg.save_every == 0 or res["stop"]):
                out["checkpoint"], last_saved = str(save(run)), run.step
            if res["stop"]:
                out["interrupted"] = True
                progress.write(f"interrupted at step {run.step}" + (
                    f"; saved {out['checkpoint']} (continue with --resume)" if cfg.save_every > 0 else ""))
                break
        if cfg.save_every > 0 and last_saved != run.step and not out["interrupted"]:
            out["checkpoint"] = str(save(run))
    except GlmkitError as e:
        logger.log({"kind": "event", "step": run.step, "event": "error", "message": str(e)})
        raise
    finally:
        prefetch.close()
        progress.close()
        logger.close()
        stop.restore()
    rates = _throughput(timings, positions, flops_per_token, peak * info.world_size)
    if rates["tok_per_s"]:
        rates["mfu_vs_measured_peak"] = flops_per_token * rates["tok_per_s"] / (measured * info.world_size)
    return {**out, **rates, "tokens": run.tokens}


def _throughput(timings: list[tuple[float, float]], positions: int, flops_per_token: float, peak: float) -> dict:
    """Rates over the steps after the first (which pays for start-up, compilation, allocator growth)."""
    steady = timings[1:] or timings
    if not steady:
        return {"tok_per_s": None, "mfu": None, "data_share": None, "data_s": None, "step_s": None}
    data_s, step_s = sum(t[0] for t in steady), sum(t[1] for t in steady)
    tok_s = positions * len(steady) / step_s
    return {"tok_per_s": tok_s, "mfu": flops_per_token * tok_s / peak, "data_share": data_s / step_s,
            "data_s": data_s / len(steady), "step_s": step_s / len(steady)}


def measure_data_share(cfg: TrainConfig, steps: int = 20) -> dict:
    """Train `steps` steps of `cfg` in a scratch directory (no checkpoints, no validation) and report
    the time spent waiting for data against the whole step: {"data_share", "data_s", "step_s",
    "tok_per_s", "mfu", "mfu_basis", "steps"} (per-step means over the steps after the first)."""
    with tempfile.TemporaryDirectory(prefix="glmkit-datashare-") as tmp:
        probe = TrainConfig(**{**asdict(cfg), "out_dir": tmp, "max_steps": steps, "save_every": 0,
                               "eval_every": 0, "progress": False, "tensorboard": False, "resume": False,
                               "overwrite": True})
        res = train(probe)
    keys = ("data_share", "data_s", "step_s", "tok_per_s", "mfu", "mfu_basis", "mfu_vs_measured_peak")
    return {"steps": steps, **{k: res.get(k) for k in keys}}


# ------------------------------------------------------------------------------------------ command line

def field_help(cls=TrainConfig) -> dict[str, str]:
    """The string literal under each dataclass field: the `--help` text of its option."""
    tree = ast.parse(inspect.getsource(cls))
    body, out = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            out[node.target.id] = " ".join(str(nxt.value.value).split())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    helps = field_help()
    for f in fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split("|")[0].strip()
        text = helps.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            shown = "" if "default" in text else f" (default: {f.default})"
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=f.default,
                                help=text + shown)


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        res = train(cfg)
    finally:
        D.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f": loss {res['loss']:.4f}" if res["loss"] is not None else " (nothing left to train)"
        val = f", val loss {res['val_loss']:.4f}" if res["val_loss"] is not None else ""
        rate = f", {res['tok_per_s']:,.0f} tokens/s" if res.get("tok_per_s") else ""
        print(f"step {res['step']}{loss}{val}{rate}; run in {res['run_dir']}"
              + (f", checkpoint {res['checkpoint']}" if res["checkpoint"] else ""))
    return 130 if res["interrupted"] else 0
