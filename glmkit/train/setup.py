"""What a training run is made of, and building it: the options, the optimizer, the data, the run directory.

`TrainConfig` holds every option of `glmkit train` (the string under each field is its `--help` text);
`setup(cfg)` turns one into a `Run` in every process: the corpus and tokenizer, the model config
(a preset or a config.json, with overrides), the objective, the parallelized model (with the run's
attention backend, Flex kernel options and MoE implementation set on it), AdamW over
`param_groups` with the warmup + cosine `lr_factor`, this process's data shards and its fixed
validation batches. It also checks the run directory against `--resume` / `--overwrite`, comparing
the setup's fingerprint (tokenizer, model, objective, `MUST_MATCH` options, data shards) with the
one saved there, and returns the checkpoint to resume from, if any.

The loop that trains a `Run`, checkpoints it and resumes it is `glmkit.train.loop`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glmkit.checkpoint import store as ckpt_io
from glmkit.errors import GlmkitError
from glmkit.train import distributed as D

# ------------------------------------------------------------------------------------------ the options

@dataclass
class TrainConfig:
    out_dir: str = "runs/glm"
    """run directory: metrics.jsonl, train_config.json, checkpoints/"""
    model: str = "small"
    """model preset name (see glmkit.model.config PRESETS) or a config.json path"""
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
    attention_backend: str = "auto"
    """attention kernel: auto | sdpa | flex | split | segments (glmkit.model.attention; a run-time choice:
    a run resumes under another one)"""
    flex_options: str = ""
    """FlexAttention kernel options as JSON, e.g. '{"BLOCK_M": 64, "BLOCK_N": 64}' (default: torch's)"""
    moe_impl: str = "auto"
    """MoE expert computation: auto | loop | grouped (glmkit.model.moe)"""
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
    chat_data: str | None = None
    """fine-tune on chat: a JSONL file of OpenAI-style conversations ({"messages": [...], "tools": [...]}),
    instead of a corpus and objective; needs --init (glmkit sft)"""
    chat_format: str = "glm4"
    """chat format the conversations are rendered in: glm4 | glm45"""
    chat_val: str | None = None
    """chat JSONL for the validation loss (default: none)"""
    lora_rank: int = 0
    """chat fine-tuning: LoRA adapters of this rank (through peft; 0: full fine-tuning); the checkpoints hold
    the merged weights"""
    lora_alpha: float | None = None
    """LoRA alpha (default: 2 x rank); the adapter's output is scaled by alpha / rank"""
    lora_targets: str = "qkv_proj,o_proj,gate_up_proj,down_proj"
    """comma-separated linear layers that get adapters (attention: qkv_proj, o_proj; MLP: gate_up_proj,
    down_proj)"""
    rl_tasks: str | None = None
    """reinforcement learning from outcomes (glmkit rl): a task folder written by `glmkit tooltasks` (its
    train_tasks.jsonl and facts.sqlite), played by the model through the agent loop and rewarded by the checked
    answer; needs --init, instead of --chat-data"""
    rl_group: int = 4
    """RL: attempts per task; each attempt's advantage is its reward minus the group's mean"""
    rl_tasks_per_batch: int = 4
    """RL: tasks per micro-batch, each played --rl-group times (the rows are as many as the rounds need)"""
    rl_temperature: float = 1.0
    """RL: sampling temperature of the attempts (1: the policy itself)"""
    rl_max_new_tokens: int = 96
    """RL: most tokens of one reply"""
    rl_max_rounds: int = 4
    """RL: most generation rounds (replies) of one attempt"""
    rl_scale_std: bool = False
    """RL: also divide each group's advantages by its reward standard deviation (GRPO; default: mean only)"""
    rl_format_reward: float = 0.0
    """RL: reward added to an attempt whose every attempted call parsed cleanly and that ended with an answer"""
    rl_concurrency: int = 1
    """RL: attempts of a task decoded together on one engine (faster; 1: resume samples bit for bit the same,
    more: the same up to float rounding)"""
    init: str | None = None
    """start from this model: a glmkit run or checkpoint folder, a converted HF folder or an HF folder
    (its tokenizer and config come with it)"""
    resume: bool = False
    """continue the run in out_dir from its latest checkpoint (start fresh if it has none)"""
    overwrite: bool = False
    """delete the run already in out_dir and start over"""

    def validate(self) -> TrainConfig:
        """Check every option that can be checked without the corpus (so a mistake is reported before
        the default corpus is built or a model allocated); returns self."""
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "keep", "lr", "eps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise GlmkitError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        at_least_zero = ("eval_every", "save_every", "prefetch", "warmup_steps", "weight_decay", "grad_clip",
                         "router_bias_rate")
        for name in at_least_zero:
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise GlmkitError(f"--{name.replace('_', '-')} must be 0 or more (got {value})")
        checks = [(self.dtype in ("auto", "fp32", "bf16"), "--dtype must be auto, fp32 or bf16"),
                  (self.parallel in D.MODES, f"--parallel must be one of {', '.join(D.MODES)}"),
                  (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
                  (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
                  (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
                  (self.data_shards is None or self.data_shards > 0, "--data-shards must be positive"),
                  (self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                   f"--device {self.device!r} is not a device; use auto, cpu or cuda (cuda:N for one GPU)")]
        for ok, msg in checks:
            if not ok:
                raise GlmkitError(msg)
        from glmkit.model.attention import BACKENDS, check_flex_options
        from glmkit.model.moe import IMPLS
        if self.attention_backend not in BACKENDS:
            raise GlmkitError(f"--attention-backend must be one of {', '.join(BACKENDS)}")
        if self.moe_impl not in IMPLS:
            raise GlmkitError(f"--moe-impl must be one of {', '.join(IMPLS)}")
        try:
            check_flex_options(self.flex_options)
        except GlmkitError as e:
            raise GlmkitError(f"--flex-options: {e}") from None
        D.resolve_device(self.device)          # cuda on a machine without CUDA
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise GlmkitError(f"--out-dir {self.out_dir} is a file; give a folder for the run (created if missing)")
        if self.rl_tasks is not None:
            return self._validate_rl()
        if self.chat_data is not None or self.init is not None:
            return self._validate_chat()
        if self.lora_rank:
            raise GlmkitError("--lora-rank applies to chat fine-tuning (glmkit sft)")
        if self.corpus is not None:
            _check_corpus_dir(self.corpus)
        _check_model(self.model)
        parse_model_overrides(self.model_overrides)
        build_objective(self)                  # --objective and --mixture
        return self

    def _validate_chat(self) -> TrainConfig:
        from glmkit.chat.render import FORMATS
        if self.chat_data is None or self.init is None:
            raise GlmkitError("--chat-data and --init go together: fine-tuning reads chat data into a model "
                              "it starts from (glmkit sft --init CKPT --chat-data train.jsonl)")
        for flag, value in (("--chat-data", self.chat_data), ("--chat-val", self.chat_val)):
            if value is not None and not Path(value).is_file():
                raise GlmkitError(f"{flag} {value} is not a file; give a JSONL file of conversations")
        if not Path(self.init).exists():
            raise GlmkitError(f"--init {self.init} does not exist; give a glmkit run / checkpoint folder or a "
                              "(converted) HF model folder")
        if self.chat_format not in FORMATS:
            raise GlmkitError(f"--chat-format must be one of {', '.join(FORMATS)}")
        if self.lora_rank < 0 or (self.lora_alpha is not None and self.lora_alpha <= 0):
            raise GlmkitError(f"--lora-rank must be 0 (full fine-tuning) or more, and --lora-alpha positive "
                              f"(got {self.lora_rank}, {self.lora_alpha})")
        if self.lora_rank and self.parallel == "fsdp":
            raise GlmkitError("--lora-rank with --parallel fsdp is not supported; use ddp (the adapter is small)")
        if self.corpus is not None or self.model_overrides or self.mixture:
            raise GlmkitError("--corpus, --model-overrides and --mixture do not apply to chat fine-tuning: the "
                              "model, its tokenizer and its objective come from --init")
        return self

    def _validate_rl(self) -> TrainConfig:
        from glmkit.chat.render import FORMATS
        if self.init is None or self.chat_data is not None:
            raise GlmkitError("RL starts from a model and plays tasks: give --init and --rl-tasks, without "
                              "--chat-data (glmkit rl --init runs/sft --rl-tasks data/tooltasks)")
        checks = [(self.chat_format in FORMATS, f"--chat-format must be one of {', '.join(FORMATS)}"),
                  (self.rl_group >= 2, f"--rl-group must be 2 or more (got {self.rl_group}): the group's mean "
                                       "reward is each attempt's baseline"),
                  (self.rl_tasks_per_batch >= 1 and self.rl_concurrency >= 1,
                   "--rl-tasks-per-batch and --rl-concurrency must be positive"),
                  (self.rl_temperature > 0, "--rl-temperature must be positive (RL samples; 0 would be greedy)"),
                  (self.rl_max_new_tokens >= 1 and self.rl_max_rounds >= 1,
                   "--rl-max-new-tokens and --rl-max-rounds must be positive"),
                  (self.prefetch == 0, "--prefetch must be 0 for RL: a batch is sampled from the weights of the "
                                       "step that trains on it"),
                  (self.parallel != "fsdp", "RL with --parallel fsdp is not supported (the sampling engine needs "
                                            "whole weights); use ddp"),
                  (not self.lora_rank, "--lora-rank is not supported with RL; fine-tune all weights"),
                  (self.corpus is None and not self.model_overrides and not self.mixture,
                   "--corpus, --model-overrides and --mixture do not apply to RL: the model, its tokenizer and "
                   "its objective come from --init")]
        for ok, msg in checks:
            if not ok:
                raise GlmkitError(msg)
        if not Path(self.init).exists():
            raise GlmkitError(f"--init {self.init} does not exist; give a glmkit run / checkpoint folder or a "
                              "(converted) HF model folder")
        if not Path(self.rl_tasks, "train_tasks.jsonl").is_file():
            raise GlmkitError(f"--rl-tasks {self.rl_tasks} has no train_tasks.jsonl; write a task folder with "
                              f"`glmkit tooltasks --out {self.rl_tasks}`")
        return self

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.05 * self.max_steps))


# RL options the sampled episodes depend on (in an RL run's fingerprint)
RL_MUST_MATCH = ("rl_group", "rl_tasks_per_batch", "rl_temperature", "rl_max_new_tokens", "rl_max_rounds",
                 "rl_scale_std", "rl_format_reward")
# fields a resumed run must share with its checkpoint (the rest: schedule length, logging, saving, speed,
# and the run-time choices attention_backend / flex_options / moe_impl, which change no result's meaning)
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

# HF config.json names users bring along -> the GLMConfig field they mean
HF_FIELD_NAMES = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
                  "num_key_value_heads": "num_kv_heads", "rms_norm_eps": "norm_eps", "layer_norm_eps": "norm_eps",
                  "layernorm_epsilon": "norm_eps", "ffn_hidden_size": "intermediate_size",
                  "multi_query_group_num": "num_kv_heads", "padded_vocab_size": "vocab_size",
                  "seq_length": "max_position_embeddings", "n_embd": "hidden_size", "n_layer": "num_layers",
                  "n_head": "num_heads"}


def parse_model_overrides(text: str) -> dict:
    """'hidden_size=128,num_layers=2' -> {"hidden_size": 128, "num_layers": 2}, each key a GLMConfig
    field and each value of its type; anything else is a GlmkitError naming the item and the fix
    (an HF name gets the glmkit name, a typo the closest field)."""
    import difflib
    from dataclasses import fields

    from glmkit.model.config import GLMConfig
    types = {f.name: str(f.type) for f in fields(GLMConfig)}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = (x.strip() for x in item.partition("="))
        if not sep or not key:
            raise GlmkitError(f"--model-overrides item {item!r} is not key=value, e.g. 'hidden_size=128,num_layers=2'")
        if key not in types:
            hint = HF_FIELD_NAMES.get(key) or next(iter(difflib.get_close_matches(key, types, 1)), None)
            fix = f"did you mean {hint}?" if hint else f"known fields: {', '.join(types)}"
            raise GlmkitError(f"--model-overrides: {key!r} is not a GLMConfig field; {fix}")
        out[key] = _override_value(key, raw, types[key])
    return out


def _override_value(key: str, raw: str, kind: str):
    """`raw` read as the field's type: int, float, bool, str (with None where the field allows it)."""
    if "None" in kind and raw.lower() in ("none", "null"):
        return None
    base = kind.split("|")[0].strip()
    try:
        if base == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        return {"int": int, "float": float}.get(base, str)(raw)
    except ValueError:
        raise GlmkitError(f"--model-overrides: {key}={raw!r} is not a valid {base}; e.g. "
                          f"{key}={ {'int': '128', 'float': '0.5', 'bool': 'true'}.get(base, 'name') }") from None


def _check_model(model: str) -> None:
    from glmkit.model.config import PRESETS
    if model.endswith(".json") or os.path.isdir(model):
        path = Path(model) / "config.json" if os.path.isdir(model) else Path(model)
        if not path.is_file():
            raise GlmkitError(f"--model {model}: no config.json there; give a preset ({', '.join(PRESETS)}) or a "
                              "config.json written by glmkit")
    elif model not in PRESETS:
        raise GlmkitError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path")


def _check_corpus_dir(corpus: str) -> None:
    path = Path(corpus)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file"
        raise GlmkitError(f"--corpus {corpus} {what}; give a corpus folder (build one with `glmkit corpus build`) "
                          "or leave --corpus out for the default corpus")
    if not (path / "manifest.json").is_file():
        raise GlmkitError(f"--corpus {corpus} is not a glmkit corpus (no manifest.json); build one there with "
                          f"`glmkit corpus build ... --out {corpus}` or leave --corpus out for the default corpus")


def build_model_config(cfg: TrainConfig, tokenizer):
    from glmkit.model.config import GLMConfig
    is_file = cfg.model.endswith(".json") or os.path.isdir(cfg.model)
    config = GLMConfig.load(cfg.model) if is_file else GLMConfig.from_name(cfg.model)
    overrides = parse_model_overrides(cfg.model_overrides)
    if is_file and config.vocab_size < tokenizer.vocab_size:
        raise GlmkitError(f"{cfg.model} has vocab_size {config.vocab_size} but the corpus tokenizer has "
                          f"{tokenizer.vocab_size} tokens; raise vocab_size in the config")
    if not is_file:  # presets take the corpus tokenizer's vocabulary
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
    overrides.setdefault("max_position_embeddings", max(config.max_position_embeddings, cfg.seq_len))
    return config.with_(**overrides)


def build_objective(cfg: TrainConfig):
    from glmkit.data.objective_config import PRESETS, ObjectiveConfig
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
    lora_scaling: float | None = None    # a LoRA run: alpha / rank (checkpoints hold the merged weights)

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


def _wrap_and_optimize(model, cfg: TrainConfig, info: D.DistInfo):
    """The run's choices applied to `model`, then parallelised, with AdamW and its warmup / cosine
    schedule: (module, optimizer, scheduler), the same for pretraining and chat fine-tuning."""
    model.set_runtime(attention_backend=cfg.attention_backend, flex_options=cfg.flex_options, moe_impl=cfg.moe_impl)
    module = D.parallelize(model, info, cfg.parallel, cfg.compile, cfg.activation_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    warmup = cfg.warmup                  # a derived property: read once, not at every scheduler step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, cfg.max_steps, cfg.min_lr_ratio))
    return module, optimizer, scheduler


def on_main(info: D.DistInfo, fn):
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
    from glmkit.data.corpus import Corpus, default_corpus
    if cfg.corpus is None:
        return default_corpus(progress=cfg.progress)  # builds data/default on first use (file-locked)
    _check_corpus_dir(cfg.corpus)
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
    from dataclasses import fields

    from glmkit.model.config import RUNTIME_KEYS, GLMConfig

    out = []
    for part in ("tokenizer", "model", "objective", "train", "data_shards"):
        a, b = old.get(part), new.get(part)
        if part == "model" and isinstance(a, dict):      # older runs saved run-time keys in the config
            a = {k: v for k, v in a.items() if k not in RUNTIME_KEYS}
            # and lack fields added since (e.g. rope_scaling), which they built with the default value
            a = {**{f.name: f.default for f in fields(GLMConfig) if f.name not in a}, **a}
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
    from glmkit.data.batches import BatchIterator
    docs = corpus.documents("val")
    if cfg.eval_every <= 0 or not docs:
        return []
    it = BatchIterator(docs, objective, specials, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1,
                       rank=0, world_size=1)
    # every rank must run the same number of forwards (FSDP2 gathers parameters in each)
    n = -(-cfg.eval_batches // info.world_size) * info.world_size
    batches = [next(it) for _ in range(n)]
    return batches[info.rank::info.world_size]


def setup(cfg: TrainConfig, episodes=None) -> tuple[Run, Path | None]:
    """This process's `Run` of `cfg`, and the checkpoint to resume it from (None: start fresh). `episodes`:
    the `glmkit.train.rl.EpisodeSource` an RL run (`cfg.rl_tasks`) samples from."""
    from glmkit.data.batches import BatchIterator
    from glmkit.data.objective_config import SpecialIds
    from glmkit.model.glm import GLM

    cfg.validate()
    info = D.init(cfg.device)
    run_dir = Path(cfg.out_dir)
    if (cfg.rl_tasks is not None) != (episodes is not None):
        raise GlmkitError("an RL run (rl_tasks) needs its episode source and only an RL run takes one; "
                          "run it with `glmkit rl`")
    if cfg.chat_data is not None or cfg.rl_tasks is not None:
        return _setup_chat(cfg, info, run_dir, episodes)
    if info.enabled:  # rank 0 builds the default corpus if needed (or fails for all); then every rank opens it
        on_main(info, lambda: [_open_corpus(cfg), None][1])
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
    resume_from = on_main(info, lambda: _prepare_run_dir(cfg, run_dir, fingerprint))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 does not broadcast)
    model = GLM(model_config).to(info.device)
    module, optimizer, scheduler = _wrap_and_optimize(model, cfg, info)
    train_docs = corpus.documents("train")
    if not train_docs:
        raise GlmkitError(f"the corpus at {corpus.directory} has no training documents")
    iterators = {s: BatchIterator(train_docs, objective, specials, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                  rank=s, world_size=data_shards)
                 for s in range(info.rank, data_shards, info.world_size)}
    run = Run(cfg, info, run_dir, tokenizer, model_config, objective, module, optimizer, scheduler, iterators,
              _val_batches(cfg, corpus, objective, specials, info), fingerprint, data_shards)
    return run, resume_from


def _setup_chat(cfg: TrainConfig, info: D.DistInfo, run_dir: Path, episodes=None) -> tuple[Run, Path | None]:
    """`setup` for chat fine-tuning: the model, tokenizer and objective of --init, the chat data rendered
    in --chat-format (`glmkit.train.chat_data`), in the engine's layout for that objective; or, for RL,
    the episodes sampled from `episodes` (`glmkit.train.rl`)."""
    from glmkit.checkpoint.loader import load
    from glmkit.train.chat_data import ChatBatchIterator, data_hash, load_chat_jsonl, pack_rows

    loaded = load(cfg.init, for_inference=False, dtype=torch.float32)  # fp32 master weights; autocast does bf16
    tokenizer, model = loaded.tokenizer, loaded.model
    # CLM-trained and converted HF models read the chat causally; GLM-trained ones as [gMASK]'s fill
    if loaded.objective == "mlm":
        raise GlmkitError(f"--init {cfg.init} was trained with the MLM objective, which cannot generate; "
                          "fine-tune a GLM- or CLM-trained model")
    layout = "causal" if loaded.objective == "clm" else "chat"
    if episodes is None:
        examples = load_chat_jsonl(cfg.chat_data, cfg.chat_format, tokenizer, cfg.seq_len)
        data = data_hash(examples)
    else:                  # what the samples depend on besides the weights: the tasks, their scoring, the sampling
        data = {"tasks": episodes.fingerprint, **{k: getattr(cfg, k) for k in RL_MUST_MATCH}}
    data_shards = cfg.data_shards or info.world_size
    if data_shards % info.world_size:
        raise GlmkitError(f"--data-shards {data_shards} must be a multiple of the {info.world_size} processes")
    model_config = model.config
    objective = {"kind": loaded.objective, "chat": cfg.chat_format, "layout": layout, "data": data}
    lora_scaling = None
    if cfg.lora_rank:
        from glmkit.train.lora import add_lora
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
        add_lora(model, cfg.lora_rank, alpha, targets)
        lora_scaling = alpha / cfg.lora_rank
        # the adapter resumes on the frozen base, so the base must be the same model: the resolved --init
        objective["lora"] = {"rank": cfg.lora_rank, "alpha": alpha, "targets": list(targets),
                             "init": str(Path(cfg.init).resolve())}
    fingerprint = {"tokenizer": tokenizer.hash, "model": model_config.to_dict(), "objective": objective,
                   "train": {k: getattr(cfg, k) for k in MUST_MATCH}, "data_shards": data_shards}
    fingerprint = json.loads(json.dumps(fingerprint))
    resume_from = on_main(info, lambda: _prepare_run_dir(cfg, run_dir, fingerprint))

    torch.manual_seed(cfg.seed)
    model = model.to(info.device).train()
    module, optimizer, scheduler = _wrap_and_optimize(model, cfg, info)
    if episodes is None:
        iterators = {s: ChatBatchIterator(examples, cfg.batch_size, cfg.seq_len, layout, tokenizer.pad_id,
                                          seed=cfg.seed, rank=s, world_size=data_shards)
                     for s in range(info.rank, data_shards, info.world_size)}
    else:
        from glmkit.train.rl import RLBatchIterator
        iterators = {s: RLBatchIterator(episodes, model, tokenizer, group=cfg.rl_group, tasks=cfg.rl_tasks_per_batch,
                                        seq_len=cfg.seq_len, layout=layout, scale_std=cfg.rl_scale_std,
                                        seed=cfg.seed, rank=s, world_size=data_shards)
                     for s in range(info.rank, data_shards, info.world_size)}
    val = []
    if cfg.chat_val is not None and cfg.eval_every > 0:
        rest = load_chat_jsonl(cfg.chat_val, cfg.chat_format, tokenizer, cfg.seq_len)
        while rest and len(val) < cfg.eval_batches:
            batch, placed = pack_rows(rest, cfg.batch_size, cfg.seq_len, layout, tokenizer.pad_id)
            val.append(batch)
            rest = rest[placed:]
        val = val[info.rank::info.world_size]
    run = Run(cfg, info, run_dir, tokenizer, model_config, objective, module, optimizer, scheduler, iterators,
              val, fingerprint, data_shards, lora_scaling=lora_scaling)
    return run, resume_from
