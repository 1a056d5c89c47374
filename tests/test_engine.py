"""The engine: continuous batching equals each request alone, requests joining and cancelled mid-flight,
prefix reuse equals a fresh prefill, forced tokens, stop strings, streamed text, log-probabilities and
scoring against a full forward with the reference mask."""

import pytest
import torch

from glmkit.batch import Batch, dense_mask
from glmkit.data.tokenizer import GLMTokenizer
from glmkit.errors import GlmkitError
from glmkit.infer.engine import Engine, Request
from glmkit.infer.sampling import SamplingConfig
from glmkit.infer.text import parse_prompt, score, stream
from glmkit.model.attention import AttentionMask
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

TEXTS = ["The quick brown fox jumps over the lazy dog. A small cat sat on the warm mat. " * 2,
         "北京是中国的首都。上海是一个大城市。我们今天去公园散步。" * 2, "Emoji 😀🎉 are fun! 中文也可以。"]
FAMILIES = ["tiny", "tiny-0414", "tiny-moe", "tiny-glm", "tiny-glm130b", "tiny-chatglm"]


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer.train(TEXTS * 4, vocab_size=420)


def _model(name, tok, seed=0):
    torch.manual_seed(seed)
    return GLM(GLMConfig.from_name(name, vocab_size=tok.vocab_size)).eval()


def _mixed_requests(tok, n_new=6):
    """Causal, infilling (several blanks, [gMASK]) and chat-layout requests of different lengths."""
    cfg = SamplingConfig(max_new_tokens=n_new)
    out = []
    for t in ["The quick brown fox", "北京", "A small cat sat on the warm mat and the dog"]:
        out.append(Request.causal(tok.encode(t), cfg))
    for t in ["The quick [MASK] fox [MASK] over the lazy [sMASK]", "北京是[MASK]的首都[gMASK]", "A small cat[MASK]"]:
        p = parse_prompt(tok.encode(t, allow_special=True), tok)
        out.append(Request.infill(p.ids, p.blanks, cfg))
    chat = [tok.gmask_id, tok.sop_id, tok.user_id] + tok.encode("\nHello there") + [tok.assistant_id]
    out.append(Request.chat(chat, cfg, stop_ids=(tok.user_id, tok.observation_id)))
    return out


def _alone(model, tok, reqs):
    return [Engine(model, tok, max_batch=1).generate([r])[0].tokens for r in reqs]


@pytest.mark.parametrize("name", FAMILIES)
def test_continuous_batch_equals_each_request_alone(name, tok):
    """7 requests through 3 rows with prompts fed in chunks of 4: rows are reused as requests finish
    and newcomers join running ones; every request decodes exactly what it decodes alone."""
    model = _model(name, tok)
    reqs = _mixed_requests(tok)
    batched = [r.tokens for r in Engine(model, tok, max_batch=3, prefill_chunk=4).generate(reqs)]
    assert batched == _alone(model, tok, reqs)
    assert sum(len(b) for t in batched for b in t) > 20


def test_request_added_mid_flight_and_cancelled_mid_flight(tok):
    model = _model("tiny", tok)
    reqs = _mixed_requests(tok, n_new=12)
    want = _alone(model, tok, reqs)
    engine = Engine(model, tok, max_batch=3, prefill_chunk=4)
    got = {}
    ends = {}
    rid_of = {engine.add(reqs[0]): 0, engine.add(reqs[1]): 1}
    doomed = engine.add(reqs[3])
    step = 0
    while engine.has_work():
        step += 1
        if step == 3:                             # joins while the others decode
            rid_of[engine.add(reqs[6])] = 6
        if step == 4:
            engine.cancel(doomed)
        for o in engine.step():
            if o.token is not None:
                got.setdefault(o.request, [[]])
                while len(got[o.request]) <= o.blank:
                    got[o.request].append([])
                got[o.request][o.blank].append(o.token)
            if o.finished:
                ends[o.request] = o.finished
    assert ends[doomed] == "cancelled"
    assert 0 < sum(map(len, got.get(doomed, [[]]))) < sum(map(len, want[3]))
    for rid, i in rid_of.items():
        assert got[rid] == want[i], i
        assert ends[rid] in ("stop", "length")
    assert all(seq is None for seq in engine.row_seq)        # every row free again (cached)


def test_waiting_requests_run_when_rows_free_up(tok):
    model = _model("tiny", tok)
    reqs = _mixed_requests(tok)
    engine = Engine(model, tok, max_batch=1)
    for r in reqs:
        engine.add(r)
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == len(reqs) - 1
    results = engine.generate([])                            # drains the queue
    assert results == [] and not engine.has_work()


def test_a_prompt_longer_than_a_row_is_a_clear_error(tok):
    model = _model("tiny", tok)
    engine = Engine(model, tok, max_batch=2, max_len=16)
    with pytest.raises(GlmkitError, match=r"prompt is 20 tokens but a KV-cache row holds 16.*max_len"):
        engine.add(Request.causal(list(range(20)), SamplingConfig()))
    with pytest.raises(GlmkitError, match="vocabulary"):
        engine.add(Request.causal([tok.vocab_size + 5], SamplingConfig()))
    with pytest.raises(GlmkitError, match="inside Part A"):
        engine.add(Request([1, 2, 3], 2, (2,)))
    assert not engine.has_work()


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-chatglm"])
def test_prefix_reuse_gives_the_logits_of_a_fresh_prefill(name, tok):
    """A chat's second turn starts from the cached row of the first: only its new tokens are fed, and
    its log-probabilities (top 5 at every step) equal those of a fresh engine."""
    model = _model(name, tok)
    cfg = SamplingConfig(max_new_tokens=5)
    turn1 = [tok.gmask_id, tok.sop_id, tok.user_id] + tok.encode("\nWhere is Beijing?") + [tok.assistant_id]
    engine = Engine(model, tok, max_batch=2)
    [first] = engine.generate([Request.chat(turn1, cfg, logprobs=5)])
    turn2 = turn1 + first.tokens[0] + [tok.user_id] + tok.encode("\nAnd Shanghai?") + [tok.assistant_id]
    fed = engine.fed_tokens
    [again] = engine.generate([Request.chat(turn2, cfg, logprobs=5)])
    assert engine.reused_tokens >= len(turn1) + len(first.tokens[0]) - 1
    assert engine.fed_tokens - fed <= len(turn2) - len(turn1) + 5 + 1
    [fresh] = Engine(model, tok, max_batch=1).generate([Request.chat(turn2, cfg, logprobs=5)])
    assert again.tokens == fresh.tokens
    torch.testing.assert_close(torch.tensor(again.logprobs), torch.tensor(fresh.logprobs), atol=1e-5, rtol=1e-5)


def test_shared_prefix_is_copied_to_concurrent_requests(tok):
    """Requests sharing a system prompt with a running request copy its cached prefix."""
    model = _model("tiny", tok)
    system = [tok.gmask_id, tok.sop_id, tok.system_id] + tok.encode("\nYou are a helpful assistant. " * 3)
    cfg = SamplingConfig(max_new_tokens=8)
    users = [system + [tok.user_id] + tok.encode(f"\nQuestion {i}?") + [tok.assistant_id] for i in range(3)]
    engine = Engine(model, tok, max_batch=4)
    engine.generate([Request.chat(users[0], SamplingConfig(max_new_tokens=1))])
    got = [r.tokens for r in engine.generate([Request.chat(u, cfg) for u in users])]
    assert engine.reused_tokens >= 3 * len(system)
    assert got == [Engine(model, tok, max_batch=1).generate([Request.chat(u, cfg)])[0].tokens for u in users]


def _forcing(target: list[int]):
    """A logits processor that makes the model 'choose' the target tokens, then <|endoftext|>."""
    def proc(produced, row):
        i = len(produced)
        out = torch.full_like(row, float("-inf"))
        out[target[i] if i < len(target) else target[-1] * 0] = 0.0
        return out
    return proc


def test_streamed_text_equals_the_final_text_on_chinese_and_emoji(tok):
    model = _model("tiny", tok)
    text = "北京是中国的首都。Emoji 😀🎉 and 🦊🐱 are fun! 猫狗"      # 🦊🐱猫狗 are unseen: byte tokens
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)          # some characters span several tokens
    eot = tok.eot_id
    req = Request.causal(tok.encode("Say:"), SamplingConfig(max_new_tokens=len(ids) + 2),
                         logits_processor=_forcing(ids + [eot]))
    engine = Engine(model, tok)
    pieces = [o.text for o in engine.stream([req]) if o.text]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    cut = Request.causal(tok.encode("Say:"), SamplingConfig(max_new_tokens=len(ids) - 1),
                         logits_processor=_forcing(ids))       # ends inside a character: never shown as U+FFFD
    [res] = Engine(model, tok).generate([cut])
    assert "\ufffd" not in res.texts[0] and text.startswith(res.texts[0])


def test_multi_token_stop_string_is_never_streamed(tok):
    model = _model("tiny", tok)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    stop = "over the"
    req = Request.causal(tok.encode("Say:"), SamplingConfig(max_new_tokens=len(ids)),
                         logits_processor=_forcing(ids), stop_strings=(stop,))
    outs = list(Engine(model, tok).stream([req]))
    streamed = "".join(o.text for o in outs)
    assert streamed == text[:text.find(stop)]
    assert outs[-1].finished == "stop_string"
    assert sum(o.token is not None for o in outs) < len(ids)     # decoding stopped at the match


def test_forced_tokens_are_fed_as_if_prompted(tok):
    """A hook that appends tokens after the model's 2nd token: they are yielded (forced=True) and the
    continuation equals that of a request whose prompt already holds them."""
    model = _model("tiny", tok)
    injected = tok.encode(" RESULT 42 ")
    prompt = tok.encode("The quick brown")
    hook = lambda produced: injected if len(produced) == 2 else None
    [res] = Engine(model, tok).generate([Request.causal(prompt, SamplingConfig(max_new_tokens=6), forced=hook)])
    outs = list(Engine(model, tok).stream([Request.causal(prompt, SamplingConfig(max_new_tokens=6), forced=hook)]))
    forced = [o.token for o in outs if o.forced]
    assert forced == injected
    first2 = res.tokens[0][:2]
    assert res.tokens[0][2:2 + len(injected)] == injected
    [ref] = Engine(model, tok).generate([Request.causal(prompt + first2 + injected, SamplingConfig(max_new_tokens=4))])
    assert res.tokens[0][2 + len(injected):] == ref.tokens[0]


def test_seeded_sampling_is_the_same_alone_and_batched(tok):
    model = _model("tiny-glm", tok)
    reqs = [Request.causal(tok.encode(t), SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9,
                                                         top_k=50, repetition_penalty=1.2, seed=i))
            for i, t in enumerate(["The quick", "北京是", "A small cat"])]
    batched = [r.tokens for r in Engine(model, tok, max_batch=3).generate(reqs)]
    assert batched == _alone(model, tok, reqs)


def _full_logits(model, ids, pos, blk, sep):
    T = len(ids)
    t = lambda x: torch.tensor([x])
    b = Batch(input_ids=t(ids), targets=t([0] * T), loss_mask=t([False] * T), position_ids=t(pos),
              block_position_ids=t(blk), segment_ids=t([0] * T), sep=t([sep] * T), span_ids=t([1] * T))
    with torch.no_grad():
        h = model(b.input_ids, b.position_ids, b.block_position_ids, AttentionMask("sdpa", dense=dense_mask(b)[:, None]))
        return torch.log_softmax(model.logits(h[0]).float(), -1)


def test_logprobs_and_scores_equal_a_full_forward(tok):
    model = _model("tiny", tok)
    p = parse_prompt(tok.encode("The capital of France is [MASK].", allow_special=True), tok)
    [res] = Engine(model, tok).generate([Request.infill(p.ids, p.blanks, SamplingConfig(max_new_tokens=3),
                                                        logprobs=3, ignore_stop=True)])
    fill = res.tokens[0]
    A, m = len(p.ids), p.blanks[0]
    seq = p.ids + [tok.sop_id] + fill
    lp = _full_logits(model, seq, list(range(A)) + [m] * (len(fill) + 1), [0] * A + list(range(1, len(fill) + 2)), A)
    want = [float(lp[A + k, fill[k]]) for k in range(len(fill))]
    torch.testing.assert_close(torch.tensor(res.logprobs[0]), torch.tensor(want), atol=1e-5, rtol=1e-5)
    cands = ["Paris", "Rome and", "北京"]
    scores = score(model, tok, "The capital of France is [MASK].", cands)
    for c, s in zip(cands, scores):
        ids = tok.encode(c) + [tok.eop_id]
        seq = p.ids + [tok.sop_id] + ids
        lp = _full_logits(model, seq, list(range(A)) + [m] * (len(ids) + 1), [0] * A + list(range(1, len(ids) + 2)), A)
        assert s == pytest.approx(sum(float(lp[A + k, ids[k]]) for k in range(len(ids))), abs=1e-4)


def test_stream_of_several_prompts_keeps_rows_apart(tok):
    model = _model("tiny", tok)
    texts = ["The quick [MASK] fox [MASK] dog.", "北京是[MASK]的首都"]
    cfg = SamplingConfig(max_new_tokens=4)

    def pieces(ts):
        out = {}
        for piece in stream(model, tok, ts, cfg):
            out[(piece.row, piece.blank)] = out.get((piece.row, piece.blank), "") + piece.text
        return out

    together = pieces(texts)
    alone = {(row, b): t for row, text in enumerate(texts) for (_, b), t in pieces([text]).items()}
    assert together == alone and together


@pytest.mark.slow
def test_compiled_decode_equals_eager(tok):
    model = _model("tiny", tok)
    reqs = _mixed_requests(tok)
    eager = [r.tokens for r in Engine(model, tok, max_batch=3).generate(reqs)]
    compiled = [r.tokens for r in Engine(model, tok, max_batch=3, compile=True).generate(reqs)]
    assert compiled == eager


def test_bench_engine_reports_what_it_measured(capsys):
    """`glmkit bench engine` on a tiny workload: every request produced its tokens on all three sides,
    the same greedy tokens as HF continuous batching, and ratios that are the quotients of the rates."""
    pytest.importorskip("transformers")
    import json

    from glmkit.cli import main
    assert main(["bench", "engine", "--preset", "tiny", "--requests", "5", "--min-prompt", "4", "--max-prompt", "30",
                 "--min-new", "2", "--max-new", "9", "--max-batch", "3", "--patterns", "burst"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = out["burst"]
    assert r["match"] == 1.0
    assert out["ratio_vs_hf_continuous"] == pytest.approx(r["engine_tokens_per_s"] / r["hf_continuous_tokens_per_s"])
    assert out["ratio_vs_hf_sequential"] == pytest.approx(r["engine_tokens_per_s"] / r["hf_sequential_tokens_per_s"])
    for side in ("engine", "hf_continuous", "hf_sequential"):
        assert r[f"{side}_tokens_per_s"] == pytest.approx(out["new_tokens"] / r[f"{side}_wall_s"])
        assert 0 < r[f"{side}_p50_ms"] <= r[f"{side}_p99_ms"] <= r[f"{side}_wall_s"] * 1e3 + 1e-6
    assert 5 * 2 <= out["new_tokens"] <= 5 * 9 and 5 * 4 <= out["prompt_tokens"] <= 5 * 30
