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

This file holds the loop: one optimizer step, validation, checkpoint save / restore, the run with its
logging and throughput. The data prefetcher, which also builds on the host what a step would otherwise
read back from the device (mask metadata, loss positions), is `glmkit.train.prefetch`. The options (`TrainConfig`, whose field docstrings
are the `--help` text of `glmkit.cli.train`) and the building of a run (`setup`) are in
`glmkit.train.setup`; `glmkit.train.loop.TrainConfig` stays importable from here.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from glmkit.checkpoint import store as ckpt_io
from glmkit.errors import GlmkitError
from glmkit.train import distributed as D
from glmkit.train.metrics import MetricsLogger, Progress, measured_matmul_peak, peak_flops
from glmkit.train.prefetch import Prefetcher, StepBatch, prepare
from glmkit.train.setup import Run, TrainConfig, on_main, setup
from glmkit.train.setup import build_model_config as build_model_config  # re-exported (public API)

# ------------------------------------------------------------------------------------------ one step

def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or any(
        s in text for s in ("can't allocate memory", "not enough memory", "out of memory"))


def prepare_batches(run: Run, batches: list) -> list[StepBatch]:
    """Numpy micro-batches as `StepBatch`es for this run's model (what the prefetcher hands the loop)."""
    return [_preparer(run)(b) for b in batches]


def _preparer(run: Run):
    return functools.partial(prepare, backend=run.model.attention_backend, device=run.info.device,
                             dtype=run.compute_dtype)


def _scalar(value: float, device) -> torch.Tensor:
    """A (1,) float64 tensor filled on `device`: `torch.tensor(x, device="cuda")` would be a blocking
    copy from the host, which waits for the GPU."""
    return torch.full((1,), value, dtype=torch.float64, device=device)


def train_step(run: Run, batches: list[StepBatch], stop_requested: bool = False) -> dict:
    """Forward/backward over this process's micro-batches (from the prefetcher, or `prepare_batches`),
    then one optimizer step.

    Returns {"loss", "lr", "grad_norm", "loss_tokens", "stop"}: `loss` is the global token-weighted mean
    over `loss_tokens` loss positions (all processes); `stop` is
    True when any process was asked to stop (all ranks see the same value). Raises GlmkitError on a
    non-finite loss or gradient norm, without touching the weights.

    On a GPU the step waits for the device exactly twice, both deliberate and marked below: reading the
    loss (with the global loss-token count and the stop flag) and reading the gradient norm. Whatever
    else depends on the batch was computed on the host by `glmkit.train.prefetch.prepare`.
    """
    dev, world = run.info.device, run.info.world_size
    # loss positions of every rank, summed on the device: the micro-batches' weights without a read-back
    n_global = D.all_reduce_sum(_scalar(float(sum(b.n_loss for b in batches)), dev))[0]
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for i, item in enumerate(batches):
        item = item.to(dev)
        attn = run.model.attention_mask(item.batch, plan=item.plan, dtype=run.compute_dtype)
        with D.gradient_sync(run.module, enabled=i == len(batches) - 1):
            with run.autocast:
                loss = run.module(item.batch, attn, item.loss_index)
            # DDP / FSDP2 average gradients over ranks: scale so the result is sum(loss * n) / n_global
            (loss.float() * (item.n_loss * world / n_global).float()).backward()
        loss_sum += loss.detach().double() * item.n_loss
    totals = D.all_reduce_sum(torch.cat([loss_sum[None], _scalar(float(stop_requested), dev)]))
    # deliberate device-to-host sync 1 of 2: the loss (checked for non-finite values below), read
    # together with the stop flag and the global loss-token count
    loss_total, stop, n_global = torch.cat([totals, n_global[None]]).tolist()
    if n_global == 0:
        raise GlmkitError(f"step {run.step + 1}: the batch has no loss positions; check the corpus and objective")
    loss_value = loss_total / n_global
    # deliberate device-to-host sync 2 of 2: the gradient norm (returned as a float, checked below)
    grad_norm = D.clip_grad_norm(run.module, run.cfg.grad_clip)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_norm}"
        last = ckpt_io.latest_checkpoint(run.run_dir / "checkpoints")
        fix = (f"the last good checkpoint is {last}; lower --lr (now {run.cfg.lr:g}), raise --warmup-steps or use "
               "--dtype fp32, then --resume" if last is not None else
               f"no checkpoint was saved yet; lower --lr (now {run.cfg.lr:g}), raise --warmup-steps or use --dtype "
               "fp32, and start again with --overwrite")
        raise GlmkitError(f"non-finite {what} at step {run.step + 1}; stopped without updating the weights or "
                          f"saving: {fix}")
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    moe = run.model.moe_layers() if hasattr(run.model, "moe_layers") else []
    if moe and run.cfg.router_bias_rate > 0:
        for m in moe:  # every rank applies the same update: from the load counted on all ranks
            D.all_reduce_sum(m.expert_load)
        run.model.update_router_bias(run.cfg.router_bias_rate)
    return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "loss_tokens": int(n_global), "stop": stop > 0}


def evaluate(run: Run) -> float | None:
    """Token-weighted mean loss over the fixed validation batches of all processes."""
    if not run.val_batches:
        return None
    dev = run.info.device
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    run.module.eval()
    with torch.no_grad():
        for item in prepare_batches(run, run.val_batches):
            item = item.to(dev)
            attn = run.model.attention_mask(item.batch, plan=item.plan, dtype=run.compute_dtype)
            with run.autocast:
                loss = run.module(item.batch, attn, item.loss_index)
            sums += torch.cat([loss.double()[None] * item.n_loss, _scalar(float(item.n_loss), dev)])
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
    adapter = None
    if run.lora_scaling is not None:  # the plain model's weights, loadable anywhere; the adapter to resume
        from glmkit.train.lora import adapter_state_dict, merged_state_dict
        adapter = adapter_state_dict(model_state)
        model_state = merged_state_dict(model_state, run.lora_scaling)
    optim_state = D.optimizer_state_dict(run.module, run.optimizer)
    rng = D.all_gather_object(_rng_state(run.info.device))
    data = {}
    for part in D.all_gather_object(run.data_states):
        data.update(part)
    train_state = {"step": run.step, "tokens": run.tokens, "optimizer": optim_state,
                   "scheduler": run.scheduler.state_dict(), "rng": rng, "data": data,
                   "train_config": asdict(run.cfg), "world_size": run.info.world_size}
    if adapter is not None:
        train_state["lora"] = adapter

    def write():
        return ckpt_io.save_checkpoint(
            run.run_dir / "checkpoints", run.step, model_state=model_state,
            save_config=run.model_config.save, save_tokenizer=lambda p: run.tokenizer.save(p.parent),
            train_state=train_state, fingerprint=run.fingerprint, keep=run.cfg.keep)

    return Path(on_main(run.info, lambda: str(write())))


def restore(run: Run, path: Path) -> None:
    """Load a checkpoint verified by `_prepare_run_dir` into every process."""
    ck = ckpt_io.load_checkpoint(path, verify_files=False)
    ts = ck.train_state
    if run.lora_scaling is not None:     # the frozen base is --init's weights; the adapter is in the train state
        from glmkit.train.lora import load_adapter
        load_adapter(run.model, ts["lora"])
    else:
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


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None, episodes=None) -> dict:
    """Train as `cfg` says; returns the final metrics (step, loss, val_loss, tokens, tok_per_s, mfu,
    data_share, checkpoint, interrupted, ...). Raises GlmkitError on bad input. `log` gets the run's
    lines (model size, validation losses, interruption) when the progress bar is off; with the bar
    they are written above it. `episodes`: an RL run's `glmkit.train.rl.EpisodeSource`."""
    run, resume_from = setup(cfg, episodes)
    if resume_from is not None:
        restore(run, resume_from)
    return _loop(run, resumed=resume_from is not None, log=log)


def _loop(run: Run, resumed: bool, log: Callable[[str], None] | None = None) -> dict:
    cfg, info = run.cfg, run.info
    logger = MetricsLogger(run.run_dir, enabled=info.is_main, resume_step=run.step if resumed else None,
                           tensorboard=cfg.tensorboard)
    model = run.model
    # MFU counts the FLOPs the model performs: the vocabulary projection only at loss positions
    # (GLMConfig.training_flops), so a GLM step is not credited with work it skips
    flops_per_token = run.model_config.flops_per_token(cfg.seq_len)
    peak, peak_basis = peak_flops(info.device, run.compute_dtype)
    # on a GPU, MFU against the data sheet and against a measured matmul peak (DESIGN.md section 4)
    measured = measured_matmul_peak(info.device, run.compute_dtype, n=8192, iters=10) \
        if info.device.type == "cuda" else peak
    positions = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size   # per optimizer step
    rl = cfg.rl_tasks is not None
    run.data_states = run.data_states or {s: copy.deepcopy(it.state_dict()) for s, it in run.iterators.items()}
    prefetch = Prefetcher(run.iterators, cfg.grad_accum, run.step * cfg.grad_accum, cfg.prefetch, _preparer(run))
    progress = Progress(cfg.max_steps, run.step, enabled=cfg.progress and info.is_main, log=log)
    if not resumed:
        logger.log({"kind": "event", "step": 0, "event": "start", "num_params": model.num_params(),
                    "flops_per_token": flops_per_token, "peak_flops": peak, "peak_basis": peak_basis,
                    "measured_peak_flops": measured,
                    "world_size": info.world_size, "parallel": D.mode_of(run.module)})
    if info.is_main:
        per_step = (f"{cfg.rl_tasks_per_batch * cfg.rl_group * cfg.grad_accum * info.world_size:,} sampled attempts"
                    if rl else f"{positions:,} positions")
        progress.write(f"{run.model_config.name}: {model.num_params():,} parameters, {per_step} "
                       f"per step on {info.world_size} x {info.device.type} ({D.mode_of(run.module)}); "
                       f"MFU against the {peak_basis}: {peak / 1e12:.3g} TFLOP/s")
    stop = _StopSignal()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"run_dir": str(run.run_dir), "step": run.step, "loss": None, "val_loss": None, "interrupted": False,
           "checkpoint": None, "mfu_basis": peak_basis, "num_params": model.num_params(),
           "trainable_params": trainable}
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
            if rl:      # RL batches have as many rows as the sampled rounds need
                positions = sum(b.batch.input_ids.numel() for b in batches) * info.world_size
            run.step, run.tokens, run.data_states = run.step + 1, run.tokens + positions, states
            flops = run.model_config.training_flops(positions, res["loss_tokens"], cfg.seq_len)
            timings.append((t_data, t_step, flops, positions))
            tok_s = positions / t_step
            mfu = flops / t_step / (peak * info.world_size)
            extra = _rl_metrics(run) if rl else {}
            logger.log({"kind": "train", "step": run.step, "loss": res["loss"], "lr": res["lr"],
                        "grad_norm": res["grad_norm"], "tokens": run.tokens, "tok_per_s": tok_s, "mfu": mfu,
                        "data_s": t_data, "step_s": t_step, **extra})
            shown = {"reward": f"{extra['reward']:.3f}"} if "reward" in extra else {}
            progress.update(1, loss=f"{res['loss']:.4f}", **shown, tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
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
    rates = _throughput(timings, peak * info.world_size)
    if rates["tok_per_s"]:
        rates["mfu_vs_measured_peak"] = rates["mfu"] * peak / measured
    return {**out, **rates, "tokens": run.tokens, "peak_memory_bytes": _peak_memory(info.device)}


def _rl_metrics(run: Run) -> dict:
    """The RL iterators' episode measurements since the last step (`RLBatchIterator.pop_metrics`), prefixed
    `rl_` except the reward; this process's episodes only."""
    out = {}
    for it in run.iterators.values():
        for key, value in it.pop_metrics().items():
            out[key if key == "reward" else f"rl_{key}"] = value
    return out


def _peak_memory(device: torch.device) -> int:
    """The peak memory of this process: allocated on a GPU, resident set size on the CPU (whole process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _throughput(timings: list[tuple[float, float, int, int]], peak: float) -> dict:
    """Rates over the steps after the first (which pays for start-up, compilation, allocator growth);
    `timings`: (data wait s, step s, FLOPs, positions) per step."""
    steady = timings[1:] or timings
    if not steady:
        return {"tok_per_s": None, "mfu": None, "data_share": None, "data_s": None, "step_s": None}
    data_s, step_s, flops, positions = (sum(t[i] for t in steady) for i in range(4))
    tok_s = positions / step_s
    return {"tok_per_s": tok_s, "mfu": flops / step_s / peak, "data_share": data_s / step_s,
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
