"""Chunked prefill: a long causal prompt, or a GLM Part A that is bidirectional over the whole prompt,
fed in chunks equals a one-shot prefill (every family); a RoPE-scaled model reads beyond
max_position_embeddings; the temporaries of a chunked prefill grow with the chunk, not the prompt."""

import pytest
import torch

from glmkit.errors import GlmkitError
from glmkit.infer.engine import Engine, Request
from glmkit.infer.runner import forward_rows, prefill_bidirectional
from glmkit.infer.sampling import SamplingConfig
from glmkit.model.attention import AttentionMask
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM
from glmkit.model.kv_cache import KVCache
from glmkit.model.rope_scaling import context_length
from tests.helpers import dense_forward, measured_cpu_peak, one_row, random_glmkit

FAMILIES = ["tiny", "tiny-0414", "tiny-moe", "tiny-glm", "tiny-glm130b", "tiny-chatglm"]
V = 128


class Ids:
    """Special ids at the top of the tiny vocabulary (random weights: any ids do)."""
    sop_id, eop_id, eot_id, gmask_id = V - 1, V - 2, V - 3, V - 4


def _model(name, **kw):
    return random_glmkit(GLMConfig.from_name(name, **kw), seed=1)


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V - 8, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_part_a_in_chunks_equals_one_forward(name):
    """prefill_bidirectional over 45 tokens in chunks of 8 (the last one short): the same hidden states
    as one forward with full bidirectional attention, and the same keys and values in the cache."""
    model = _model(name)
    ids = _prompt(45)
    pos, bpos = list(range(45)), [0] * 45
    t = lambda x: torch.tensor([x])
    with torch.no_grad():
        want = model(t(ids), t(pos), t(bpos), AttentionMask("full"))[0]
        one = KVCache.for_model(model, rows=2, max_len=64)
        forward_rows(model, one, 1, [ids], [pos], [bpos], [pos], [45])
        chunked = KVCache.for_model(model, rows=2, max_len=64)
        got = prefill_bidirectional(model, chunked, 1, ids, pos, bpos, chunk=8)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for a, b in zip(one.k + one.v, chunked.k + chunked.v):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
        assert not b[0].any()                                 # the other row is untouched


def test_part_a_in_chunks_with_an_fp8_cache_equals_one_forward_with_it():
    """With an fp8 KV pool every chunk attends to the stored (fp8-rounded) keys of all of Part A, as a
    one-shot forward through the same pool does: the same hidden states."""
    model = _model("tiny")
    ids = _prompt(40, seed=8)
    pos, bpos = list(range(40)), [0] * 40
    with torch.no_grad():
        one = KVCache.for_model(model, rows=1, max_len=48, kv_dtype="fp8")
        want = forward_rows(model, one, 0, [ids], [pos], [bpos], [pos], [40])[0]
        chunked = KVCache.for_model(model, rows=1, max_len=48, kv_dtype="fp8")
        got = prefill_bidirectional(model, chunked, 0, ids, pos, bpos, chunk=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for a, b in zip(one.k + one.v, chunked.k + chunked.v):       # equal, or one fp8 step apart (3-bit mantissa)
        torch.testing.assert_close(b.float(), a.float(), rtol=0.125, atol=2 ** -9)


def _engine_run(model, req, chunk):
    return Engine(model, Ids, max_batch=2, max_len=128, prefill_chunk=chunk).generate([req])[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_glm_request_with_a_long_part_a_decodes_as_with_one_shot_prefill(name):
    """An infilling request whose 50-token Part A is prefilled in chunks of 7, layer by layer: the same
    greedy fills of both blanks and the same log-probabilities as a one-shot prefill."""
    model = _model(name)
    ids = _prompt(50, seed=2)
    ids[10], ids[30] = Ids.gmask_id - 1, Ids.gmask_id - 1     # two [MASK]-like blanks (any id)
    req = lambda: Request.infill(ids, [10, 30], SamplingConfig(max_new_tokens=5), logprobs=0, ignore_stop=True)
    one, chunked = _engine_run(model, req(), 64), _engine_run(model, req(), 7)
    assert chunked.tokens == one.tokens and len(chunked.tokens) == 2
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(one.logprobs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_prompt_in_chunks_equals_the_reference_forward(name):
    """A 70-token causal prompt fed in chunks of 16: every prompt token's log-probability equals the
    dense-mask reference forward's, and the greedy continuation equals a one-shot prefill's."""
    model = _model(name)
    ids = _prompt(70, seed=3)
    req = lambda: Request.causal(ids, SamplingConfig(max_new_tokens=6), prompt_logprobs=True, ignore_stop=True)
    chunked, one = _engine_run(model, req(), 16), _engine_run(model, req(), 128)
    assert chunked.tokens == one.tokens
    logits = dense_forward(model, one_row(ids, list(range(70)), [0] * 70, 0))[0]
    want = torch.log_softmax(logits, -1)[torch.arange(69), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(chunked.prompt_logprobs), want, atol=1e-5, rtol=1e-5)


def test_chat_layout_long_prompt_in_chunks():
    """A chat-layout request (Part A = [gMASK], the rest causal) of 60 tokens in chunks of 9."""
    model = _model("tiny")
    ids = [Ids.gmask_id, Ids.sop_id] + _prompt(58, seed=4)
    req = lambda: Request.chat(ids, SamplingConfig(max_new_tokens=5), logprobs=0, ignore_stop=True)
    chunked, one = _engine_run(model, req(), 9), _engine_run(model, req(), 128)
    assert chunked.tokens == one.tokens
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(one.logprobs), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ RoPE-scaled context

@pytest.mark.parametrize("scaling, window, want", [
    (None, 32, 32),
    ({"rope_type": "linear", "factor": 4.0}, 32, 128),
    ({"rope_type": "dynamic", "factor": 2.0}, 32, 64),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64, 64),   # as released
    ({"rope_type": "yarn", "factor": 4.0}, 32, 128),                                         # window = original
])
def test_context_length_of_each_scaling(scaling, window, want):
    config = GLMConfig.from_name("tiny", max_position_embeddings=window, rope_scaling=scaling)
    assert config.context_length == want == context_length(config.rope_scaling, window)
    assert GLMConfig.from_name("tiny-glm").context_length == 256       # learned positions: the table


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 4.0}])
def test_scaled_rope_model_prefills_beyond_max_position_embeddings(scaling):
    """A 32-position model with 4x RoPE scaling reads a 100-token prompt (in chunks of 24): its prompt
    log-probabilities equal the reference forward's; without scaling the engine refuses the prompt."""
    model = _model("tiny", max_position_embeddings=32, rope_scaling=scaling)
    ids = _prompt(100, seed=5)
    req = Request.causal(ids, SamplingConfig(max_new_tokens=4), prompt_logprobs=True, ignore_stop=True)
    [res] = Engine(model, Ids, max_batch=1, max_len=110, prefill_chunk=24).generate([req])
    assert len(res.tokens[0]) == 4
    logits = dense_forward(model, one_row(ids, list(range(100)), [0] * 100, 0))[0]
    want = torch.log_softmax(logits, -1)[torch.arange(99), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(res.prompt_logprobs), want, atol=1e-5, rtol=1e-5)
    plain = GLM(GLMConfig.from_name("tiny", max_position_embeddings=32)).eval()
    with pytest.raises(GlmkitError, match="at most 32 positions"):
        Engine(plain, Ids, max_batch=1, max_len=110).add(req)


# --------------------------------------------------------------------------------------- memory

def _part_a_peak(model, n, chunk):
    pool = KVCache.for_model(model, rows=1, max_len=n)
    ids = _prompt(n, seed=6)
    with torch.inference_mode():
        return measured_cpu_peak(lambda: prefill_bidirectional(model, pool, 0, ids, list(range(n)), [0] * n, chunk))


def test_part_a_prefill_memory_grows_with_the_chunk_not_the_prompt():
    """Peak bytes allocated by a chunked Part A prefill (torch's memory profiler), prompt 4x longer at
    the same chunk: the growth is the Part-A-long buffers alone (residual stream, queries, cos/sin and
    the id tensors: per token 2 x hidden + rotary dim fp32 values and 3 int64), never a (T, T) or
    (T, ffn) temporary; a one-shot prefill (chunk = prompt) grows by its MLP activations on top."""
    model = _model("tiny", max_position_embeddings=4096)
    c = model.config
    per_token = 4 * (2 * c.hidden_size + c.rotary_dim) + 3 * 8
    short, long = _part_a_peak(model, 512, 64), _part_a_peak(model, 2048, 64)
    assert long - short <= 1.1 * per_token * (2048 - 512)
    one_short, one_long = _part_a_peak(model, 512, 512), _part_a_peak(model, 2048, 2048)
    assert one_long - one_short >= (2048 - 512) * 4 * 2 * c.intermediate_size     # the (T, 2 ffn) gate/up


def test_causal_chunk_temporaries_do_not_grow_with_the_context():
    """One causal chunk of 32 tokens at the end of a 2048-slot row against one at 512: on the CPU it
    attends without a (32, kv_len) mask (`AttentionMask("causal_tail")`), so the peak grows by less
    than one byte per added (query, key) pair (a mask would add 5: bool + SDPA's float copy)."""
    model = _model("tiny", max_position_embeddings=4096)
    ids = _prompt(32, seed=7)

    def peak(kv_len):
        pool = KVCache.for_model(model, rows=1, max_len=kv_len)
        slots = list(range(kv_len - 32, kv_len))
        with torch.inference_mode():
            return measured_cpu_peak(lambda: forward_rows(model, pool, 0, [ids], [slots], [[0] * 32], [slots], [0]))

    assert peak(2048) - peak(512) < 32 * 1536


def test_causal_tail_attention_equals_the_dense_mask():
    """Queries that are the last T of S keys, causal (GQA, MHA, T = S, bf16): the log-sum-exp merge of
    two mask-free flash calls equals SDPA with the (T, S) boolean mask."""
    from glmkit.model.attention import attend
    torch.manual_seed(0)
    for H, Hkv, T, S, dtype, tol in [(4, 2, 8, 40, torch.float32, 1e-6), (4, 4, 8, 40, torch.float32, 1e-6),
                                     (8, 2, 33, 100, torch.float32, 1e-6), (4, 2, 5, 5, torch.float32, 1e-6),
                                     (4, 2, 16, 64, torch.bfloat16, 1e-2)]:
        q = torch.randn(1, T, H, 16, dtype=dtype)
        k, v = torch.randn(1, S, Hkv, 16, dtype=dtype), torch.randn(1, S, Hkv, 16, dtype=dtype)
        got = attend(q, k, v, AttentionMask("causal_tail"))
        visible = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        want = attend(q.float(), k.float(), v.float(), AttentionMask("sdpa", dense=visible[None, None]))
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------- the bench

def test_bench_context_skips_what_its_budgets_predict_too_costly():
    from glmkit.bench.context import ContextBench, _skip_reason
    bench = ContextBench(time_budget=100.0, memory_budget=1000)
    last = (1024, {"prefill_s": 10.0, "peak": 100 * 2**20})
    assert _skip_reason(None, 4096, bench) is None
    assert _skip_reason(last, 2048, bench) is None                          # 40 s, 300 MiB
    assert "predicted prefill 160 s > --time-budget 100 s" in _skip_reason(last, 4096, bench)
    low = ContextBench(time_budget=1e6, memory_budget=500)
    assert "predicted peak 600 MiB > --memory-budget 500 MiB" in _skip_reason(last, 4096, low)


@pytest.mark.slow
def test_bench_context_reports_what_it_measured(capsys, tmp_path):
    """`glmkit bench context` at two tiny lengths: both sides ran at both, the same first token as HF,
    the summary's ratios are the quotients of the longest length's points, and the PNG exists."""
    pytest.importorskip("transformers")
    import json

    from glmkit.cli import main
    png = tmp_path / "ctx.png"
    assert main(["bench", "context", "--preset", "tiny", "--lengths", "64,256", "--prefill-chunk", "32",
                 "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["max_len"] == 256 and out["match"] is True and out["skipped"] == []
    last = out["points"][-1]
    assert [p["length"] for p in out["points"]] == [64, 256]
    assert out["glmkit_peak_mb"] == last["glmkit"]["peak_mb"] and out["hf_peak_mb"] == last["hf"]["peak_mb"]
    assert out["prefill_time_ratio"] == pytest.approx(last["glmkit"]["prefill_s"] / last["hf"]["prefill_s"])
    if out["hf_peak_mb"] > 0:
        assert out["peak_ratio"] == pytest.approx(out["glmkit_peak_mb"] / out["hf_peak_mb"])
    assert png.stat().st_size > 10_000
