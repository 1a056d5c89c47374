"""Plain helpers shared by the test modules (fixtures that build expensive things once are in
conftest.py). No test module imports another: what two modules share lives here.

- data: `SP` (special ids over text ids 0..49), `MASK_IDS`, `reconstruct` (a GLM sample back to its
  document), `make_batch` / `ROWS` (rows written by hand in the exact layout of DESIGN.md §1);
- models: `tiny_model`, `random_glmkit` (every tensor random), `glmkit_logits`, `dense_forward`;
- text: `TEXTS` (bilingual), `WORDS` / `build_toy_corpus` (a learnable toy grammar with its tokenizer);
- runs: `tiny_train_config`, `train_losses`;
- HF references: `HF_VOCAB`, `HF_CASES`, `build_hf`, `hf_logits`;
- chat: `CONVERSATIONS` (OpenAI message lists with tools), `WEATHER` / `SEARCH` tools, `call`,
  `openai_with_parsed_arguments`, and hypothesis strategies of random conversations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st

from glmkit.batch import Batch, dense_mask
from glmkit.data.objective_config import SpecialIds
from glmkit.data.objectives import GMASK, MASK, SMASK
from glmkit.data.tokenizer import GLM45_TOKENS
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

# ---------------------------------------------------------------------------------------------- data

# text ids 0..49 (7 and 9 end sentences), specials above them
SP = SpecialIds(mask=100, smask=101, gmask=102, sop=103, eop=104, eot=105, pad=106, vocab_size=110,
                sentence_ends=(7, 9))
MASK_IDS = {MASK: SP.mask, SMASK: SP.smask, GMASK: SP.gmask}


def reconstruct(s, mask_id, sp=SP):
    """Put every Part B span back into its [MASK]: returns the original text and the spans
    [(start in original, length)] in Part B order."""
    sep, inp = s["sep"], s["input_ids"]
    part_a = list(inp[:sep])
    fills = {}
    order = []
    b_starts = [i for i in range(sep, len(inp)) if s["block_position_ids"][i] == 1]
    for j, b0 in enumerate(b_starts):
        b1 = b_starts[j + 1] if j + 1 < len(b_starts) else len(inp)
        assert inp[b0] == sp.sop and s["targets"][b1 - 1] == sp.eop
        assert list(inp[b0 + 1:b1]) == list(s["targets"][b0:b1 - 1])          # teacher forcing
        assert set(s["position_ids"][b0:b1]) == {s["position_ids"][b0]}
        assert list(s["block_position_ids"][b0:b1]) == list(range(1, b1 - b0 + 1))
        p = int(s["position_ids"][b0])
        assert part_a[p] == mask_id and p not in fills
        fills[p] = list(inp[b0 + 1:b1])
        order.append(p)
    assert sorted(fills) == [i for i, t in enumerate(part_a) if t == mask_id]
    out, starts = [], {}
    for i, t in enumerate(part_a):
        if i in fills:
            starts[i] = len(out)
            out.extend(fills[i])
        else:
            out.append(t)
    return out, [(starts[p], len(fills[p])) for p in order]


def make_batch(rows, T, vocab=128, layout="glm", seed=0) -> Batch:
    """Rows written by hand in the layout of DESIGN.md §1: each sample is ("glm", |A|, [span lengths]),
    ("clm", n) or ("mlm", n); a row is a list of samples packed back to back and padded to T."""
    rng = np.random.default_rng(seed)
    f = {k: np.zeros((len(rows), T), dtype=np.int64) for k in
         ("input_ids", "targets", "position_ids", "block_position_ids", "segment_ids", "sep", "span_ids")}
    f["loss_mask"] = np.zeros((len(rows), T), dtype=bool)
    for r, samples in enumerate(rows):
        t = 0
        for s, (kind, n, *spans) in enumerate(samples):
            start = t
            if kind == "glm":
                spans = spans[0]
                slots = rng.choice(n, size=len(spans), replace=False)          # [MASK] positions in Part A
                f["position_ids"][r, t:t + n] = np.arange(n)
                f["sep"][r, t:] = start + n
                t += n
                for j, (L, m) in enumerate(zip(spans, slots)):
                    f["position_ids"][r, t:t + L + 1] = m
                    f["block_position_ids"][r, t:t + L + 1] = np.arange(1, L + 2)
                    f["span_ids"][r, t:t + L + 1] = 1 if layout == "glm" else j + 1
                    f["loss_mask"][r, t:t + L + 1] = True
                    t += L + 1
            else:
                f["position_ids"][r, t:t + n] = np.arange(n)
                f["sep"][r, t:] = start if kind == "clm" else start + n
                f["loss_mask"][r, t:t + n] = True if kind == "clm" else rng.random(n) < 0.3
                t += n
            f["segment_ids"][r, start:t] = s
        f["segment_ids"][r, t:] = -1
        f["sep"][r, t:] = T
        assert t <= T, "samples overflow the row"
    f["input_ids"] = rng.integers(0, vocab, size=(len(rows), T))
    f["targets"] = np.where(f["loss_mask"], rng.integers(0, vocab, size=(len(rows), T)), 0)
    return Batch(**f).to("cpu")


ROWS = {
    "one_sample": [[("glm", 12, [3, 2])], [("glm", 9, [4, 1, 2])]],
    "packed": [[("glm", 6, [2]), ("clm", 5), ("mlm", 4)], [("glm", 5, [1, 1]), ("glm", 4, [2])]],
}


# -------------------------------------------------------------------------------------------- models

def tiny_model(name: str = "tiny", seed: int = 0, **overrides) -> GLM:
    """A freshly initialised preset model in eval mode (the library's own init, seeded)."""
    torch.manual_seed(seed)
    return GLM(GLMConfig.from_name(name, **overrides)).eval()


def random_glmkit(config: GLMConfig, seed: int = 0) -> GLM:
    """A glmkit model with every tensor random (norms around 1, biases and router bias non-zero)."""
    torch.manual_seed(seed)
    model = GLM(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn_like(t))
            else:
                t.copy_(0.3 * torch.randn_like(t))
    return model


def glmkit_logits(model, ids: torch.Tensor, attn=None) -> torch.Tensor:
    """Causal logits of a glmkit model; 1-D RoPE families read position + block position (0 here)."""
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with torch.no_grad():
        return model.logits(model(ids, pos, torch.zeros_like(pos), attn=attn)).float()


def dense_forward(model, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits of a full forward through the dense reference mask (`glmkit.batch.dense_mask`)."""
    from glmkit.model.attention import AttentionMask
    b = batch.to("cpu")
    with torch.no_grad():
        h = model(b.input_ids, b.position_ids, b.block_position_ids,
                  AttentionMask("sdpa", dense=dense_mask(b)[:, None]))
        return model.logits(h).float()


def one_row(ids, position_ids, block_position_ids, sep: int, span_ids=None) -> Batch:
    """A one-row Batch of one sample (no loss positions) from plain lists."""
    T = len(ids)
    t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64))[None]
    return Batch(input_ids=t(ids), targets=t([0] * T), loss_mask=t([0] * T).bool(), position_ids=t(position_ids),
                 block_position_ids=t(block_position_ids), segment_ids=t([0] * T), sep=t([sep] * T),
                 span_ids=t(span_ids if span_ids is not None else [0] * T))


def blank_logits(model, left: list[int], right: list[int], fill: list[int], objective: str, sp) -> torch.Tensor:
    """Logits that read a blank the way `objective` trained, by a full forward through the dense mask
    (built here from DESIGN.md §1, independently of glmkit.eval): row i predicts fill[i].

    glm: `left [MASK] right | <sop> fill` with Part B at (len(left), 1..); n + 1 rows, the last
    predicting what follows the fill (<eop> when it is complete). clm: `left fill`, causal; n + 1 rows,
    the last predicting the next token. mlm: `left [MASK]*n right`, bidirectional; n rows (`fill` only
    gives the length)."""
    n, m = len(fill), len(left)
    if objective == "glm":
        a = left + [sp.mask] + right
        ids = a + [sp.sop] + list(fill)
        row = one_row(ids, list(range(len(a))) + [m] * (n + 1), [0] * len(a) + list(range(1, n + 2)), len(a),
                      [0] * len(a) + [1] * (n + 1))
        return dense_forward(model, row)[0, len(a):]
    if objective == "clm":
        ids = left + list(fill)
        return dense_forward(model, one_row(ids, list(range(len(ids))), [0] * len(ids), 0))[0, m - 1:]
    if objective == "mlm":
        ids = left + [sp.mask] * n + right
        return dense_forward(model, one_row(ids, list(range(len(ids))), [0] * len(ids), len(ids)))[0, m:m + n]
    raise ValueError(objective)


def greedy_fill(model, left: list[int], right: list[int], n: int, objective: str, sp) -> list[int]:
    """The blank filled greedily by recomputing `blank_logits` from scratch for every token: glm stops
    after <eop> (not included) or n tokens; clm writes exactly n tokens; mlm takes the argmax at n masks."""
    if objective == "mlm":
        return blank_logits(model, left, right, [0] * n, "mlm", sp).argmax(-1).tolist()
    fill: list[int] = []
    while len(fill) < n:
        x = int(blank_logits(model, left, right, fill, objective, sp)[-1].argmax())
        if objective == "glm" and x == sp.eop:
            break
        fill.append(x)
    return fill


# ---------------------------------------------------------------------------------------------- text

TEXTS = ["The quick brown fox jumps over the lazy dog. A small cat sat on the warm mat. " * 3,
         "北京是中国的首都。上海是一个大城市。我们今天去公园散步。天气很好。" * 3,
         "In the beginning God created the heaven and the earth. And the earth was without form. " * 3]


def train_tokenizer(texts=None, vocab_size: int = 420):
    """A small byte-level BPE trained on `texts` (default: `TEXTS`, four times)."""
    from glmkit.data.tokenizer import GLMTokenizer
    return GLMTokenizer.train(texts or TEXTS * 4, vocab_size=vocab_size)


WORDS = ("the cat dog bird sat ran flew on under over a mat tree house red blue green small big old "
         "young happy sad quickly slowly and but then when").split()


def build_toy_corpus(out: Path, seed: int = 0, n_docs: int = 160, vocab_size: int = 300):
    """A small corpus of sentences from a toy grammar (learnable in a few dozen steps), with its own
    byte-level BPE tokenizer. `seed` changes the text, hence the tokenizer."""
    from glmkit.data.corpus import build_corpus
    from glmkit.data.sources import Document, Source
    from glmkit.data.tokenizer import GLMTokenizer

    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        sents = [" ".join(rng.choice(WORDS, size=rng.integers(4, 9))).capitalize() + "."
                 for _ in range(rng.integers(2, 6))]
        docs.append(Document(" ".join(sents), "toy", f"doc{i}"))
    source = Source("toy", "test data", "generated", read=lambda src: iter(docs))
    tokenizer = GLMTokenizer.train([d.text for d in docs], vocab_size=max(vocab_size, 512))
    return build_corpus([source], tokenizer, out, val_fraction=0.1, overwrite=True)


# ---------------------------------------------------------------------------------------------- runs

def tiny_train_config(corpus_dir, out_dir, **kw):
    """A 12-step run of the tiny model on a toy corpus (checkpoints at 4, 8, 12 keeping 2; eval at 6, 12)."""
    from glmkit.train.setup import TrainConfig

    base = dict(out_dir=str(out_dir), model="tiny", corpus=str(corpus_dir), seq_len=64, batch_size=4,
                max_steps=12, lr=3e-3, warmup_steps=2, eval_every=6, eval_batches=2, save_every=4, keep=2,
                progress=False, tensorboard=False, prefetch=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def train_losses(run_dir) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


# ------------------------------------------------------------------------------------ HF references

HF_VOCAB = 96
# (HF class, extra config) per case: GQA and MHA, partial rotary factors, biases on and off, a head_dim
# that is not hidden/heads, tied embeddings, MoE with shared experts, first-k dense layers, QK norm,
# expert groups, unnormalised top-k weights.
HF_CASES = {
    "glm-gqa": ("GlmForCausalLM", dict(num_key_value_heads=2, head_dim=8, attention_bias=True,
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            partial_rotary_factor=0.5))),
    "glm-mha-tied": ("GlmForCausalLM", dict(num_key_value_heads=4, head_dim=16, attention_bias=False,
                                            tie_word_embeddings=True,
                                            rope_parameters=dict(rope_type="default", rope_theta=500.0,
                                                                 partial_rotary_factor=1.0))),
    "glm4-gqa": ("Glm4ForCausalLM", dict(num_key_value_heads=1, head_dim=8, attention_bias=True,
                                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                              partial_rotary_factor=0.5))),
    "glm4-mha": ("Glm4ForCausalLM", dict(num_key_value_heads=4, head_dim=16, attention_bias=False,
                                         rope_parameters=dict(rope_type="default", rope_theta=1000.0,
                                                              partial_rotary_factor=0.25))),
    "moe-qknorm": ("Glm4MoeForCausalLM", dict(num_key_value_heads=2, head_dim=16, attention_bias=True,
                                              use_qk_norm=True, n_routed_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16, n_shared_experts=1,
                                              first_k_dense_replace=1, routed_scaling_factor=2.5,
                                              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                   partial_rotary_factor=0.5))),
    "moe-groups": ("Glm4MoeForCausalLM", dict(num_key_value_heads=4, head_dim=8, attention_bias=False,
                                              use_qk_norm=False, n_routed_experts=8, num_experts_per_tok=3,
                                              moe_intermediate_size=8, n_shared_experts=2,
                                              first_k_dense_replace=0, n_group=4, topk_group=2,
                                              norm_topk_prob=False, routed_scaling_factor=1.0,
                                              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                   partial_rotary_factor=1.0))),
}


def build_hf(case: str, seed: int = 0, **overrides):
    """A tiny random HF model of `case` (config keys in `overrides` replace the case's), every tensor
    randomised, eager attention, fp32."""
    import transformers

    arch, extra = HF_CASES[case]
    extra = {"max_position_embeddings": 256, **extra, **overrides}
    cls = getattr(transformers, arch)
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, pad_token_id=None, eos_token_id=None,
                  bos_token_id=None, **extra)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif "e_score_correction_bias" in name:
                t.copy_(0.1 * torch.randn_like(t))
            else:
                t.copy_(0.3 * torch.randn_like(t))
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def glmkit_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with a full recompute per token (the reference the KV cache is tested against)."""
    for _ in range(n):
        ids = torch.cat([ids, glmkit_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def glmkit_greedy_cached(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding on glmkit's engine: every row a causal request in one continuous batch."""
    from types import SimpleNamespace

    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig

    v = model.config.vocab_size
    specials = SimpleNamespace(sop_id=v - 1, eop_id=v - 2, eot_id=v - 3, gmask_id=v - 4)
    engine = Engine(model, specials, max_batch=ids.shape[0], max_len=ids.shape[1] + n)
    cfg = SamplingConfig(max_new_tokens=n)
    res = engine.generate([Request.causal(row.tolist(), cfg, ignore_stop=True) for row in ids])
    return torch.cat([ids, torch.tensor([r.tokens[0] for r in res])], dim=1)


# -------------------------------------------------------------------------------------------- memory

def measured_cpu_peak(fn) -> int:
    """Peak bytes of the CPU tensors `fn()` allocates (those alive before it do not count), from the
    allocation timeline of torch's memory profiler (`torch.profiler._memory_profiler`, a private API:
    the one that sees every allocation of torch's CPU allocator, kernel workspaces included)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    now = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            now += size
        elif action == Action.DESTROY:
            now -= size
        peak = max(peak, now)
    return peak


# ---------------------------------------------------------------------------------------------- chat

def call(i: int, name: str, args: dict) -> dict:
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "opts": {"type": "object"},
                                                    "exact": {"type": "boolean"}}}}}

# name -> (messages, tools, formats it applies to)
CONVERSATIONS = {
    "plain": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!\nHow can I help?"},
               {"role": "user", "content": "你好，北京天气怎么样？"}], None, ("glm4", "glm45")),
    "call": ([{"role": "user", "content": "Weather in Beijing?"},
              {"role": "assistant", "content": None, "tool_calls": [call(1, "get_weather", {"city": "北京"})]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}], [WEATHER], ("glm4", "glm45")),
    "parallel": ([{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "北京和上海的天气？"},
                  {"role": "assistant", "content": "我来查一下。", "tool_calls": [
                      call(1, "get_weather", {"city": "北京"}), call(2, "get_weather", {"city": "上海", "days": 2})]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "晴，3°C"},
                  {"role": "tool", "tool_call_id": "call_2", "content": "雨，9°C"},
                  {"role": "assistant", "content": "北京晴，上海有雨。", "reasoning_content": "Both answered."}],
                 [WEATHER], ("glm4", "glm45")),
    "thinking": ([{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
                  {"role": "user", "content": "Search for it"},
                  {"role": "assistant", "content": "<think>\nLet me search.\n</think>\n\nSearching.  ",
                   "tool_calls": [call(3, "search", {"q": "2+2", "opts": {"n": [1, 2.5, True, None]},
                                                     "exact": False})]},
                  {"role": "tool", "tool_call_id": "call_3", "content": "4"},
                  {"role": "assistant", "content": "It is 4.", "reasoning_content": "  The search agrees.\n"}],
                 [WEATHER, SEARCH], ("glm4", "glm45")),
    "python": ([{"role": "user", "content": "π?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [call(1, "python", {"code": "import math\nprint(math.pi)"})]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3.141592653589793"},
                {"role": "assistant", "content": "π ≈ 3.14159"}],
               [{"type": "python"}, WEATHER], ("glm4",)),
    "browser": ([{"role": "user", "content": "北京天气"},
                 {"role": "assistant", "content": None,
                  "tool_calls": [call(1, "simple_browser", {"command": 'search("北京天气")'})]},
                 {"role": "tool", "tool_call_id": "call_1", "content": " # 【0†北京天气†weather.cn】\n晴，3°C"},
                 {"role": "assistant", "content": "北京今天晴【0†weather.cn】。"}],
                [{"type": "simple_browser"}], ("glm4",)),
}


def openai_with_parsed_arguments(messages: list) -> list:
    """OpenAI message dicts with tool call arguments as mappings (what HF chat templates take)."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


# ---------------------------------------------------------------------------- random conversations
SPELLINGS = ["<|assistant|>", "<|user|>", "<|observation|>", "<|system|>", "[gMASK]", "<sop>", "<|endoftext|>",
             *GLM45_TOKENS]
PIECES = ["a", "b", "Z", " ", "  ", "\n", "\t", "北", "京", "天气", "😀", "é", "{", "}", '"', "\\", ":", ",", "<", "/"]
TEXT = st.lists(st.sampled_from(PIECES + SPELLINGS), max_size=10).map("".join)
TOOL = {"type": "function", "function": {"name": "f", "description": "A test tool.", "parameters": {
    "type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "integer"}, "o": {"type": "object"},
                                     "b": {"type": "boolean"}, "a": {"type": "array"}}}}}
GLM4_TOOLS = [TOOL, {"type": "python"}, {"type": "simple_browser"}]
VALUES = {"s": TEXT, "n": st.integers(-10**6, 10**6), "b": st.booleans(),
          "o": st.dictionaries(st.sampled_from(["x", "键", "y z"]), st.one_of(TEXT, st.integers(), st.none()), max_size=3),
          "a": st.lists(st.one_of(st.integers(), TEXT, st.floats(allow_nan=False, allow_infinity=False)), max_size=3)}


@st.composite
def arguments(draw):
    keys = draw(st.permutations(list(VALUES)))[:draw(st.integers(0, len(VALUES)))]
    return {k: draw(VALUES[k]) for k in keys}


@st.composite
def conversations(draw, fmt: str, think_close: bool = False):
    """OpenAI message dicts: users, assistants with text, reasoning and calls of `TOOL` (and of
    glm4's built-in `python` and `simple_browser`), the calls' results. `think_close`: let glm45 assistant text hold </think>."""
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    n_calls = 0
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        for _ in range(draw(st.integers(0, 2))):
            content = draw(TEXT)
            if fmt == "glm45" and not think_close:
                content = content.replace("</think>", "")  # the template reads it as the end of reasoning
            msg = {"role": "assistant", "content": draw(st.sampled_from([content, None]))}
            if draw(st.booleans()):
                msg["reasoning_content"] = draw(TEXT)
            calls = []
            for _ in range(draw(st.integers(0, 2))):
                if fmt == "glm4" and draw(st.booleans()):  # a built-in tool's raw text
                    name, key = draw(st.sampled_from([("python", "code"), ("simple_browser", "command")]))
                    calls.append((name, {key: draw(TEXT)}))
                else:
                    calls.append(("f", draw(arguments())))
            msg["tool_calls"] = [{"id": f"c{n_calls + k}", "type": "function", "function": {
                "name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for k, (name, args) in enumerate(calls)]
            messages.append(msg)
            for k in range(len(calls)):
                messages.append({"role": "tool", "tool_call_id": f"c{n_calls + k}", "content": draw(TEXT)})
            n_calls += len(calls)
    return messages
