"""Evaluation tasks build deterministically; bits/byte, PET fine-tuning and the CLI on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TEXTS, blank_logits, greedy_fill

from glmkit.data.objective_config import SpecialIds
from glmkit.eval import tasks
from glmkit.eval.evaluate import bits_per_byte, choice_accuracy, infill_accuracy, pet_finetune
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM


@pytest.fixture(scope="module")
def tok(bilingual_tokenizer):
    return bilingual_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


def _docs(tok):
    return [tok.encode(t) for t in TEXTS]


def test_infill_examples_are_deterministic_and_cut_the_document(tok):
    docs = _docs(tok)
    a, b = tasks.infill_examples(docs, 10, window=48, seed=3), tasks.infill_examples(docs, 10, window=48, seed=3)
    assert a == b and len(a) > 0
    assert a != tasks.infill_examples(docs, 10, window=48, seed=4)
    for ex in a:
        whole = ex.left + ex.answer + ex.right
        assert 1 <= len(ex.answer) <= 10
        assert any(whole == d[s:s + len(whole)] for d in docs for s in range(0, len(d), 48))


def test_cloze_distractors_match_script_and_frequency(tok):
    docs = _docs(tok)
    counts = tasks.token_counts(docs)
    ex = tasks.cloze_examples(docs, tok.decode, counts, n=20, min_count=2, seed=0)
    assert ex == tasks.cloze_examples(docs, tok.decode, counts, n=20, min_count=2, seed=0)
    for c in ex:
        words = [tok.decode(x) for x in c.candidates]
        assert len(set(map(tuple, c.candidates))) == 4 and 0 <= c.label < 4
        assert {tasks._script(w) for w in words} == {c.meta["script"]}
        assert c.candidates[c.label] in ([t] for t in counts)


def test_sentiment_split_is_fixed_and_disjoint():
    train, test = tasks.sentiment_split()
    train2, test2 = tasks.sentiment_split()
    assert [r.text for r in test[:50]] == [r.text for r in test2[:50]] and len(train) == len(train2)
    assert not {r.text for r in train} & {r.text for r in test}
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    assert {r.label for r in test} == {0, 1}


def test_bits_per_byte_glm_and_clm_match_a_direct_computation(model, tok):
    docs = [tok.encode(TEXTS[0])[:30]]
    x = docs[0]
    for obj in ("glm", "clm"):
        res = bits_per_byte(model, tok, docs, obj, window=64, budget=1000)
        with torch.no_grad():
            if obj == "clm":
                ids = torch.tensor([x[:-1]])
                h = model(ids, torch.arange(len(x) - 1)[None], torch.zeros_like(ids))
            else:     # x1 [gMASK] <sop> x2..x_{n-1}: Part A bidirectional (2 tokens), Part B causal
                from glmkit.model.attention import AttentionMask
                sp = SpecialIds.from_tokenizer(tok)
                ids = torch.tensor([[x[0], sp.gmask, sp.sop] + x[1:-1]])
                T = ids.shape[1]
                mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
                mask[:, :2] = True
                pos = torch.tensor([[0] + [1] * (T - 1)])
                blk = torch.tensor([[0, 0] + list(range(1, T - 1))])
                h = model(ids, pos, blk, AttentionMask("sdpa", dense=mask[None, None]))[:, 2:]   # <sop> on
            nll = -F.log_softmax(model.logits(h[0]), -1).gather(1, torch.tensor(x[1:])[:, None]).sum().item()
        nbytes = len(tok.decode(x).encode()) - len(tok.decode(x[:1]).encode())
        assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4), obj
        assert res["tokens"] == len(x) - 1


def _eop_instead_of_its_favourite(model, blanks, sp):
    """A copy whose <eop> logit is 1.01x the logit of the token it most often writes after the first
    one of a fill: wherever that token would win, <eop> wins, so many greedy GLM fills end early and
    some blanks can be answered exactly (a random model almost never writes <eop> by itself)."""
    import copy
    from collections import Counter
    fills = [greedy_fill(model, b.left, b.right, 6, "glm", sp) for b in blanks]
    favourite = Counter(t for f in fills for t in f[1:]).most_common(1)[0][0]
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.lm_head.weight[sp.eop] = 1.01 * out.lm_head.weight[favourite]
    return out


@pytest.mark.parametrize("objective", ["glm", "mlm", "clm"])
def test_infill_accuracy_equals_a_greedy_reference(model, tok, objective):
    """exact_match and token_accuracy equal a reference that decodes every blank by recomputing the
    whole row for each token through the dense mask (`helpers.greedy_fill`, `helpers.blank_logits`).
    Every other blank gets the model's own greedy fill as its answer, so both numbers are known to be
    above 0 and a count that misses matches fails."""
    sp = SpecialIds.from_tokenizer(tok)
    blanks = tasks.infill_examples(_docs(tok), 6, window=48, seed=0)[:8]
    if objective == "glm":
        model = _eop_instead_of_its_favourite(model, blanks, sp)
    own = 0
    for i in range(0, len(blanks), 2):
        b = blanks[i]
        cap = len(b.answer) + (1 if objective == "glm" else 0)
        fill = greedy_fill(model, b.left, b.right, cap, objective, sp)
        if 0 < len(fill) < cap or (objective != "glm" and fill):     # a glm fill that ended with <eop>
            blanks[i] = tasks.Blank(b.left, b.right, fill)
            own += 1
    assert own >= 2, "the construction gave too few blanks the model answers exactly"
    exact, hits = 0, []
    for b in blanks:
        n = len(b.answer)
        exact += greedy_fill(model, b.left, b.right, n + (objective == "glm"), objective, sp) == b.answer
        logits = blank_logits(model, b.left, b.right, b.answer, objective, sp)[:n]
        hits += (logits.argmax(-1) == torch.tensor(b.answer)).tolist()
    r = infill_accuracy(model, tok, blanks, objective, batch_size=3)
    assert r == {"exact_match": exact / len(blanks), "token_accuracy": sum(hits) / len(hits), "n": len(blanks)}
    assert exact >= own


def test_pet_finetuning_fits_the_verbalizers(model, tok):
    reviews = [tasks.Review("这本书很好看，我很喜欢。", 1), tasks.Review("质量太差了，不推荐。", 0),
               tasks.Review("服务很好，下次还来。", 1), tasks.Review("房间很脏，非常失望。", 0)]
    ex = tasks.sentiment_examples(reviews, tok.encode)
    sp = SpecialIds.from_tokenizer(tok)
    before = [p.detach().clone() for p in model.parameters()]
    tuned = pet_finetune(model, ex, "glm", sp, steps=25, batch=4, lr=3e-3)
    assert choice_accuracy(tuned, ex, "glm", sp) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # the original is untouched


def test_cli_infill_and_generate_print_what_the_library_fills(model, tok, tmp_path, capsys):
    """`glmkit infill` (streamed: each blank, then the whole text) and `glmkit generate --no-stream`
    on a saved checkpoint print exactly the library's greedy results; bad input exits 2."""
    from glmkit.checkpoint.store import save_checkpoint
    from glmkit.cli import main
    from glmkit.infer.sampling import SamplingConfig
    from glmkit.infer.text import generate, infill
    save_checkpoint(tmp_path, 1, model_state=model.state_dict(), save_config=model.config.save,
                    save_tokenizer=lambda p: tok.save(p.parent), train_state={},
                    fingerprint={"objective": {"kind": "glm"}})
    cfg = SamplingConfig(max_new_tokens=3)
    [filled] = infill(model, tok, "The quick [MASK] fox [MASK].", cfg)
    [continued] = generate(model, tok, "北京是", cfg)
    capsys.readouterr()
    assert main(["infill", str(tmp_path), "The quick [MASK] fox [MASK].", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[:2] == [f"[blank 1] {filled.fills[0]}", f"[blank 2] {filled.fills[1]}"]
    assert out[2:] == [filled.text, ""]
    assert main(["generate", str(tmp_path), "北京是", "--max-new-tokens", "3", "--no-stream"]) == 0
    assert capsys.readouterr().out == continued + "\n"
    assert main(["infill", str(tmp_path), "no blank at all"]) == 2
    assert "put [MASK] where" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "x", "--top-p", "0"]) == 2
