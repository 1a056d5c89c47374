"""Blank infilling and generation: KV-cache decoding against a full recompute, spans at their blanks,
streaming, seeds, sampling filters, bad input."""

import pytest
import torch

from glmkit.batch import Batch, dense_mask
from glmkit.errors import GlmkitError
from glmkit.infer.engine import Engine, Request
from glmkit.infer.sampling import SamplingConfig, top_k_filter, top_p_filter
from glmkit.infer.text import generate, infill, parse_prompt, run_fill, stream
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM


@pytest.fixture(scope="module")
def tok(bilingual_tokenizer):
    return bilingual_tokenizer


@pytest.fixture(scope="module", params=["tiny", "tiny-chatglm"])   # 1-D RoPE; 2D RoPE
def model(request, tok):
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name(request.param, vocab_size=tok.vocab_size)).eval()


def _forward_last(model, ids, pos, blk, sep):
    """Full forward of one row with the reference mask (glm layout): logits at the last position."""
    T = len(ids)
    t = lambda x: torch.tensor([x])
    b = Batch(input_ids=t(ids), targets=t([0] * T), loss_mask=t([False] * T), position_ids=t(pos),
              block_position_ids=t(blk), segment_ids=t([0] * T), sep=t([sep] * T), span_ids=t([1] * T))
    from glmkit.model.attention import AttentionMask
    h = model(b.input_ids, b.position_ids, b.block_position_ids, AttentionMask("sdpa", dense=dense_mask(b)[:, None]))
    return model.logits(h[0, -1])


def _reference_fill(model, ids, blanks, tok, n_new):
    """Greedy infilling by recomputing the whole sequence at every step (no cache)."""
    seq, pos, blk = list(ids), list(range(len(ids))), [0] * len(ids)
    sep, fills = len(ids), []
    for p in blanks:
        seq, pos, blk = seq + [tok.sop_id], pos + [p], blk + [1]
        fill = []
        while True:
            x = int(_forward_last(model, seq, pos, blk, sep).argmax())
            if x in (tok.eop_id,) or (ids[p] == tok.gmask_id and x == tok.eot_id):
                break
            fill.append(x)
            if len(fill) == n_new:
                seq, pos, blk = seq + [x], pos + [p], blk + [len(fill) + 1]
                break
            seq, pos, blk = seq + [x], pos + [p], blk + [len(fill) + 1]
        fills.append(fill)
    return fills


def _cached_fill(model, prompts, tok, cfg, **kw):
    engine = Engine(model, tok, **kw)
    return [r.tokens for r in engine.generate([Request.infill(p.ids, p.blanks, cfg) for p in prompts])]


@pytest.mark.parametrize("kw", [{}, {"max_batch": 1}, {"max_batch": 2, "prefill_chunk": 3}])
def test_kv_cache_decoding_equals_full_recompute(model, tok, kw):
    """Prompts of different lengths decoded as one continuous batch (all at once, one at a time, or
    two rows with prompts fed in chunks of 3) fill exactly what a full recompute fills."""
    texts = ["The quick [MASK] fox [MASK] over the lazy [sMASK]", "北京是[MASK]的首都[gMASK]", "A small cat[MASK]"]
    prompts = [parse_prompt(tok.encode(t, allow_special=True), tok) for t in texts]
    cfg = SamplingConfig(max_new_tokens=4)
    got = _cached_fill(model, prompts, tok, cfg, **kw)
    for p, g in zip(prompts, got):
        assert g == _reference_fill(model, p.ids, p.blanks, tok, 4)


def test_consumer_runs_outside_the_engines_inference_mode(model, tok):
    for _ in stream(model, tok, "The quick [MASK] fox", SamplingConfig(max_new_tokens=3)):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_causal_generation_equals_full_recompute(tok):
    torch.manual_seed(1)
    model = GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    prompts = ["The quick brown", "北京"]
    got = generate(model, tok, prompts, SamplingConfig(max_new_tokens=5), causal=True)
    for text, g in zip(prompts, got):
        ids = tok.encode(text)
        for _ in range(5):
            T = len(ids)
            x = int(_forward_last(model, ids, list(range(T)), [0] * T, 0).argmax())
            if x in (tok.eop_id, tok.eot_id):
                break
            ids.append(x)
        assert g == tok.decode(ids[len(tok.encode(text)):])


def test_each_span_lands_at_its_blank(tok):
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    text = "The quick [MASK] fox jumps [MASK] the lazy dog."
    [f] = infill(model, tok, text, SamplingConfig(max_new_tokens=4))
    assert len(f.fills) == 2
    left, mid, right = "The quick ", " fox jumps ", " the lazy dog."
    assert f.text == left + f.fills[0] + mid + f.fills[1] + right


def test_streaming_equals_non_streaming_and_seed_reproduces(tok):
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name("tiny-glm", vocab_size=tok.vocab_size)).eval()
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.3, seed=7)
    texts = ["The [MASK] sat on [MASK] mat.", "我们今天去[gMASK]"]
    joined = [[""] * 2, [""]]
    for piece in stream(model, tok, texts, cfg):
        joined[piece.row][piece.blank] += piece.text
    once = run_fill(model, tok, texts, cfg)
    assert [f.fills for f in once] == joined
    assert [f.fills for f in run_fill(model, tok, texts, cfg)] == joined


def test_sampling_filters_keep_exactly_the_right_tokens():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, True, False, False]]
    probs = torch.softmax(logits, -1)[0]                    # 0.0317 0.6364 0.2341 0.0861 0.0117
    for p, keep in ((0.5, [1]), (0.63, [1]), (0.64, [1, 2]), (0.87, [1, 2]), (0.88, [1, 2, 3]), (1.0, [0, 1, 2, 3, 4])):
        kept = torch.isfinite(top_p_filter(logits, p))[0].nonzero().squeeze(-1).tolist()
        assert kept == keep, (p, probs)
    # a top-k'd, top-p'd sample only ever draws kept tokens
    g = torch.Generator().manual_seed(0)
    from glmkit.infer.sampling import sample_next
    draws = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.85), g)) for _ in range(200)}
    assert draws <= {1, 2} and draws


@pytest.mark.parametrize("kw, word", [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                      ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"),
                                      ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_sampling_values(kw, word):
    with pytest.raises(GlmkitError, match=word):
        SamplingConfig(**kw)


def test_bad_prompts(tok):
    model = GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size, max_position_embeddings=32)).eval()
    with pytest.raises(GlmkitError, match=r"put \[MASK\]"):
        infill(model, tok, "no blank here")
    with pytest.raises(GlmkitError, match="max_position_embeddings"):
        generate(model, tok, "The quick brown fox " * 10)
    with pytest.raises(GlmkitError, match="no prompt"):
        generate(model, tok, [])


@pytest.mark.slow
def test_bench_generate_json_reports_what_was_measured(capsys, monkeypatch):
    """`glmkit bench generate` with a fake clock (each glmkit run takes 0.5 s, each HF run 2 s) and
    counted runs: every run makes batch x new tokens, and the JSON's rates and ratios follow from them."""
    pytest.importorskip("transformers")
    import json

    from glmkit.bench import generate as bench
    from glmkit.cli import main
    made, last = [], []

    def counted(name, fn):
        def run(model, prompts, n_new, *rest):
            last[:] = [name]
            out = fn(model, prompts, n_new, *rest)
            made.append((name, prompts.shape[0], n_new, out))
            return out
        return run

    def fake_time(fn, device):
        fn()
        return {"glmkit": 0.5, "hf": 2.0}[last[0]]

    monkeypatch.setattr(bench, "glmkit_run", counted("glmkit", bench.glmkit_run))
    monkeypatch.setattr(bench, "hf_run", counted("hf", bench.hf_run))
    monkeypatch.setattr(bench, "_time", fake_time)
    assert main(["bench", "generate", "--preset", "tiny", "--batches", "1,3", "--new-tokens", "4",
                 "--prompt-len", "5", "--repeats", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # glmkit counts tokens over the batch, HF new tokens per row (its output width)
    assert {(n, b, per_run) for n, b, _, per_run in made} == {("glmkit", 1, 4), ("glmkit", 3, 12), ("hf", 1, 4),
                                                              ("hf", 3, 4)}
    for b in (1, 3):        # a check run, a warm-up and --repeats timed runs per batch size for glmkit
        assert sum(n == "glmkit" and bb == b for n, bb, _, _ in made) == 4
        r = out["by_batch"][str(b)]
        assert r["glmkit_tokens_per_s"] == pytest.approx(b * 4 / 0.5)
        assert r["hf_tokens_per_s"] == r["hf_dynamic_tokens_per_s"] == pytest.approx(b * 4 / 2.0)
        assert r["ratio"] == pytest.approx(r["glmkit_tokens_per_s"] / r["hf_tokens_per_s"]) == pytest.approx(4.0)
    assert set(out["by_batch"]) == {"1", "3"} and out["batch"] == 1 and out["device"] == "cpu"
    assert {k: out[k] for k in ("glmkit_tokens_per_s", "hf_tokens_per_s", "ratio")} == {
        k: out["by_batch"]["1"][k] for k in ("glmkit_tokens_per_s", "hf_tokens_per_s", "ratio")}
    assert (out["new_tokens"], out["prompt_len"], out["preset"]) == (4, 5, "tiny")


@pytest.mark.slow
def test_bench_generate_real_clock_gives_consistent_positive_rates(capsys):
    pytest.importorskip("transformers")
    import json

    from glmkit.cli import main
    assert main(["bench", "generate", "--preset", "tiny", "--batches", "2", "--new-tokens", "4",
                 "--prompt-len", "5", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["glmkit_tokens_per_s"] > 0 and out["hf_tokens_per_s"] > 0 and out["batch"] == 2
    assert out["ratio"] == pytest.approx(out["glmkit_tokens_per_s"] / out["hf_tokens_per_s"], rel=1e-9)


def test_converted_hf_checkpoint_generates_what_hf_generates(tok, tmp_path):
    """An HF folder (written by glmkit.checkpoint.hf.to_hf) loads for inference as a causal model, and its
    greedy continuation equals transformers' own `generate` on the same folder."""
    transformers = pytest.importorskip("transformers")
    from glmkit.checkpoint.hf import to_hf
    from glmkit.checkpoint.loader import load
    torch.manual_seed(2)
    to_hf(GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size)), tmp_path)
    tok.save(tmp_path)
    loaded = load(tmp_path)
    model, tok2 = loaded.model, loaded.tokenizer
    assert (loaded.objective, loaded.format) == ("clm", "hf") and model.lm_head.weight.t().is_contiguous()      # laid out for decoding
    ids = tok2.encode("The quick brown fox")
    [res] = Engine(model, tok2).generate([Request.causal(ids, SamplingConfig(max_new_tokens=6), ignore_stop=True)])
    ours = res.tokens[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    out = hf.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert ours == out[0, len(ids):].tolist()


@pytest.mark.parametrize("causal", [False, True])
def test_multi_token_stop_string_cuts_the_text_and_stops_decoding(tok, causal):
    """A stop string of several tokens ends the blank at the match: the text is cut before it, and no
    more decode steps are spent on that blank (counted as forward passes of the model)."""
    torch.manual_seed(3)
    model = GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    text = "The quick brown" if causal else "The quick brown [gMASK]"
    calls = []
    hook = model.embed_tokens.register_forward_hook(lambda *_: calls.append(1))
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=5)   # sampled: no early <eop> at random init
    try:
        free = generate(model, tok, text, cfg, causal=causal, stop=[])[0]
        steps_free = len(calls)
        assert len(tok.encode(free)) >= 12, free
        # the first 3-character piece of the free continuation (after its first quarter) that is
        # several tokens long: the stop string
        stop = next(free[i:i + 3] for i in range(len(free) // 4, len(free) - 3)
                    if "\ufffd" not in free[i:i + 3] and len(tok.encode(free[i:i + 3], allow_special=True)) > 1)
        calls.clear()
        cut = generate(model, tok, text, cfg, causal=causal, stop=[stop])[0]
    finally:
        hook.remove()
    assert cut == free[:free.find(stop)]
    assert len(calls) < steps_free - 4, (len(calls), steps_free)
