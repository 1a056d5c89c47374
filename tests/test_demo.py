"""The demo: its blank probe against a direct forward, random whole-word blanks, options checked
before any work, and a finished demo's recorded results never rewritten by a second run."""

import json

import numpy as np
import pytest
import torch

from glmkit.batch import Batch, dense_mask
from glmkit.cli import main
from glmkit.data.objective_config import SpecialIds
from glmkit.data.objectives import glm_sample
from glmkit.data.tokenizer import GLMTokenizer
from glmkit.errors import GlmkitError
from glmkit.eval.blank_probe import WordBlank, read_blanks, summarize, unigram_readings, word_blanks
from glmkit.model.attention import AttentionMask
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

TEXTS = ["In the beginning God created the heaven and the earth. And the earth was without form, and void; "
         "and darkness was upon the face of the deep. " * 3,
         "新华社北京１月１日电 国家主席江泽民发表了新年讲话。我国经济保持持续快速健康发展。" * 4]


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer.train(TEXTS * 4, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


def _direct_first_token_probs(model, tok, b: WordBlank) -> torch.Tensor:
    """The GLM sample of the document with the word as its one span (the objectives' own builder),
    one full forward with the dense reference mask, the distribution at <sop>."""
    sp = SpecialIds.from_tokenizer(tok)
    s = glm_sample(b.left + b.answer + b.right, [(len(b.left), len(b.answer))], sp)
    T = len(s["input_ids"])
    t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64))[None]        # noqa: E731
    batch = Batch(input_ids=t(s["input_ids"]), targets=t(s["targets"]), loss_mask=t(s["loss_mask"]).bool(),
                  position_ids=t(s["position_ids"]), block_position_ids=t(s["block_position_ids"]),
                  segment_ids=t([0] * T), sep=t([s["sep"]] * T), span_ids=t(s["span_ids"]))
    attn = AttentionMask("sdpa", dense=dense_mask(batch)[:, None])
    with torch.no_grad():
        h = model(batch.input_ids, batch.position_ids, batch.block_position_ids, attn)
        return torch.softmax(model.logits(h[0, s["sep"]]).float(), -1)     # <sop> sits right after Part A


def test_word_blanks_are_seeded_whole_words_in_place(tok):
    docs = [np.asarray(tok.encode(t)) for t in TEXTS]
    a = word_blanks(docs, tok, 3, 3, seed=1)
    assert a == word_blanks(docs, tok, 3, 3, seed=1) and a != word_blanks(docs, tok, 3, 3, seed=2)
    assert [b.script for b in a] == ["latin"] * 3 + ["cjk"] * 3
    for b in a:
        word = tok.decode(b.answer)
        assert (word[0] == " " and word[1:].isalpha() and len(word) >= 4) if b.script == "latin" else \
            all("\u4e00" <= c <= "\u9fff" for c in word)
        whole = b.left + b.answer + b.right
        assert any(whole == d[k:k + len(whole)].tolist() for d in docs for k in range(len(d)))
        assert len(b.left) >= 8 and len(b.right) >= 4


def test_probe_numbers_equal_a_direct_forward_with_the_dense_mask(model, tok):
    docs = [np.asarray(tok.encode(t)) for t in TEXTS]
    blanks = word_blanks(docs, tok, 3, 3, seed=0)
    readings = read_blanks(model, tok, blanks, top_k=4, batch_size=4)      # two batches, padded rows
    for b, r in zip(blanks, readings):
        p = _direct_first_token_probs(model, tok, b)
        assert r.p_first == pytest.approx(float(p[b.answer[0]]), rel=1e-4, abs=1e-7)
        assert r.rank_first == int((p > p[b.answer[0]]).sum()) + 1
        assert [t for t, _ in r.top] == p.topk(4).indices.tolist()
        assert len(r.fill) <= 8
    s = summarize(blanks, readings)
    assert s["all"]["n"] == 6 and s["latin"]["n"] == s["cjk"]["n"] == 3
    assert s["all"]["median_rank"] == float(np.median([r.rank_first for r in readings]))


def _direct_greedy_next(model, tok, b: WordBlank, fill: list[int]) -> int:
    """argmax after `<sop> fill` in Part B of `left [MASK] right`, one full forward, dense mask."""
    a = b.left + [tok.mask_id] + b.right
    ids = a + [tok.sop_id] + fill
    sep, n = len(a), len(fill) + 1
    t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64))[None]        # noqa: E731
    batch = Batch(input_ids=t(ids), targets=t([0] * len(ids)), loss_mask=t([0] * len(ids)).bool(),
                  position_ids=t(list(range(sep)) + [len(b.left)] * n), block_position_ids=t([0] * sep + list(range(1, n + 1))),
                  segment_ids=t([0] * len(ids)), sep=t([sep] * len(ids)), span_ids=t([0] * sep + [1] * n))
    with torch.no_grad():
        h = model(batch.input_ids, batch.position_ids, batch.block_position_ids,
                  AttentionMask("sdpa", dense=dense_mask(batch)[:, None]))
        return int(model.logits(h[0, -1]).argmax())


def test_probe_greedy_fills_follow_the_argmax_and_stop_where_they_cannot_match(model, tok):
    docs = [np.asarray(tok.encode(t)) for t in TEXTS]
    blanks = word_blanks(docs, tok, 3, 3, seed=0)
    readings = read_blanks(model, tok, blanks, max_new_tokens=5, shown={0, 4})
    for i, (b, r) in enumerate(zip(blanks, readings)):
        assert (r.fill[0] if r.fill else tok.eop_id) == _direct_greedy_next(model, tok, b, [])
        assert r.fill_complete == (i in (0, 4) or r.fill[0] == b.answer[0])
        if r.fill_complete:             # every token the argmax after the ones before; <eop> or the limit ends it
            for k in range(1, len(r.fill)):
                assert r.fill[k] == _direct_greedy_next(model, tok, b, r.fill[:k])
            limit = 5 if i in (0, 4) else min(5, len(b.answer) + 2)
            assert len(r.fill) == limit or _direct_greedy_next(model, tok, b, r.fill) == tok.eop_id
        else:
            assert r.fill == [r.fill[0]] and r.fill[0] != b.answer[0]


def test_unigram_readings_rank_by_training_frequency():
    blanks = [WordBlank([5] * 8, [6] * 4, [2, 3], "latin"), WordBlank([5] * 8, [6] * 4, [0], "cjk")]
    counts = {0: 5, 1: 9, 2: 1}                 # add-one: 6, 10, 2, 1 over 19
    u = unigram_readings(blanks, counts, vocab_size=4, top_k=2)
    assert [(r.rank_first, r.fill) for r in u] == [(3, [1]), (2, [1])]
    assert u[0].p_first == pytest.approx(2 / 19) and u[0].top == [(1, pytest.approx(10 / 19)), (0, pytest.approx(6 / 19))]


# ---------------------------------------------------------------------------- the command

def _record(out_dir, **recipe_changes) -> dict:
    recipe = {"max_steps": 700, "batch_size": 16, "seq_len": 128, "lr": 2e-3, "objective": "glm-130b",
              "model": "small", "corpus": None, "blanks": 64, "blank_seed": 0,
              "model_overrides": "hidden_size=256,num_layers=4,num_heads=4,num_kv_heads=2,intermediate_size=704"}
    numbers = {"bits_per_byte": 2.4, "span_token_accuracy": 0.1, "spans": 100,
               "blanks": {"all": {"n": 128, "exact": 0.02, "top1": 0.1, "top10": 0.3, "median_rank": 40.0},
                          "latin": {"median_rank": 12.0}, "cjk": {"median_rank": 90.0}}}
    return {"recipe": {**recipe, **recipe_changes}, "finished": "2026-12-03 01:00 UTC", "minutes": 10.2,
            "training": {"steps": 700, "loss": 5.99, "val_loss": 6.18, "minutes": 9.3, "step_s": 0.8,
                         "mfu": 0.31, "mfu_basis": "best measured float32 matmul on cpu"},
            "unigram": numbers, "before": numbers, "after": numbers}


def test_a_finished_demo_is_shown_not_rerun_or_rewritten(tmp_path, capsys):
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(_record(tmp_path)))
    before = path.read_bytes()
    assert main(["demo", "--out-dir", str(tmp_path), "--no-tools-stage"]) == 0
    out = capsys.readouterr().out
    assert "holds a finished demo" in out and "bits per byte" in out and "median rank" in out
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]


@pytest.mark.parametrize("argv,named", [
    (["--max-steps", "5"], "max_steps 700 -> 5"),       # another recipe over a finished demo
    (["--out-dir", "README.md"], "--out-dir"),
    (["--max-steps", "0"], "--max-steps"),
    (["--lr", "-1"], "--lr"),
    (["--blanks", "-2"], "--blanks"),
    (["--objective", "nope"], "--objective"),
    (["--corpus", "no/such/corpus"], "--corpus"),
    (["--tool-families", "arithmetic,poetry"], "--tool-families"),
    (["--tool-steps", "0"], "--tool-steps"),
    (["--tool-lr", "0"], "--tool-lr"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, argv, named):
    (tmp_path / "demo.json").write_text(json.dumps(_record(tmp_path)))
    argv = ["demo", "--out-dir", str(tmp_path)] + argv if argv[0] != "--out-dir" else ["demo"] + argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]      # nothing built or trained


def test_tiny_demo_end_to_end_then_a_rerun_keeps_its_record(tmp_path, capsys):
    from glmkit.data.corpus import build_corpus
    from glmkit.data.sources import Source, kjv_source, peoples_daily_source
    docs = [d for d, _ in zip(kjv_source(), range(8))] + [d for d, _ in zip(peoples_daily_source(), range(30))]
    tok = GLMTokenizer.train([d.text for d in docs], vocab_size=600)
    src = Source("mixed", "test", "kjv + people's daily", lambda s: iter(docs))
    corpus = build_corpus([src], tok, tmp_path / "corpus", val_fraction=0.3, seed=0)
    # the tiny model with room for the tool-use conversations (about 2,100 tokens with this small vocabulary)
    argv = ["demo", "--out-dir", str(tmp_path / "run"), "--corpus", str(corpus.directory), "--model", "tiny",
            "--model-overrides", "max_position_embeddings=4096", "--max-steps", "2", "--batch-size", "2",
            "--seq-len", "64", "--eval-every", "1", "--blanks", "2", "--no-samples", "--no-progress",
            "--tool-train", "2", "--tool-heldout", "1", "--tool-steps", "2", "--tool-batch-size", "1",
            "--tool-max-new-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "estimate:" in out and "elapsed]" in out and "word blanks (4): greedy fill exact" in out
    assert "| arithmetic (2) | fine-tuned |" in out and "user       What is " in out
    record, tools = tmp_path / "run" / "demo.json", tmp_path / "run" / "tools" / "tools.json"
    rec = json.loads(record.read_text())
    assert rec["training"]["steps"] == 2 and len(rec["blanks"]) == 4
    assert rec["unigram"]["bits_per_byte"] > 0 and rec["after"]["blanks"]["all"]["n"] == 4
    stage = json.loads(tools.read_text())
    assert stage["training"]["steps"] == 2 and stage["recipe"]["pretraining"] == rec["recipe"]
    for side in ("before", "after"):           # 2 families x 2 languages x 1 task, with tools and without
        s = stage[side]["summary"]
        assert s["tasks"] == 4 and s["episodes"] == 8 and list(s["families"]) == ["arithmetic", "lookup"]
    assert [t["task"] for t in stage["transcripts"]] == ["arithmetic-en-heldout-0000", "lookup-en-heldout-0000"]
    assert stage["seq_len"] % 128 == 0 and stage["seq_len"] - 128 < stage["longest_conversation"] <= stage["seq_len"]
    before, before_tools = record.read_bytes(), tools.read_bytes()
    assert main(argv) == 0                                        # the same command again
    out = capsys.readouterr().out
    assert "holds a finished demo" in out and "holds a finished tool-use stage" in out
    assert record.read_bytes() == before and tools.read_bytes() == before_tools
    assert main(argv[:-1] + ["5"]) == 2                           # another stage recipe: refused, nothing rewritten
    assert "max_new_tokens 4 -> 5" in capsys.readouterr().err
    assert tools.read_bytes() == before_tools
    tools.unlink()                                                # as if the stage had been interrupted
    assert main(argv[:-1] + ["5"]) == 2                           # its fine-tuning is not resumed under another recipe
    assert "unfinished tool-use stage of another recipe" in capsys.readouterr().err
    assert main(argv[:-1] + ["5", "--overwrite-tools"]) == 0      # the stage again, on the same pretrained model
    assert json.loads(tools.read_text())["recipe"]["max_new_tokens"] == 5 and record.read_bytes() == before


# ---------------------------------------------------------------------------- the tool-use stage

def test_tool_stage_recipe_is_checked_and_rows_fit_the_conversations():
    from glmkit.eval.tooldemo import ToolStage, row_length
    assert ToolStage().validate().recipe()["families"] == ["arithmetic", "lookup"]
    with pytest.raises(GlmkitError, match="--tool-families"):
        ToolStage(families=("arithmetic", "poetry")).validate()
    with pytest.raises(GlmkitError, match="--tool-steps"):
        ToolStage(steps=0).validate()
    assert row_length(ToolStage(), 1670, 2048) == 1792               # auto: rounded up to 128
    assert row_length(ToolStage(seq_len=1700), 1670, 2048) == 1700
    with pytest.raises(GlmkitError, match="shorter than the longest"):
        row_length(ToolStage(seq_len=1024), 1670, 2048)
    with pytest.raises(GlmkitError, match="max_position_embeddings"):
        row_length(ToolStage(), 1670, 1024)


def _summary(tasks, parse, em_tools, em_none):
    m = {"tasks": tasks, "parse_rate": parse, "answer_em_with_tools": em_tools, "answer_em_without_tools": em_none}
    return {**m, "families": {"arithmetic": m}}


def test_before_after_table():
    from glmkit.eval.tooldemo import before_after_table
    before = {"summary": _summary(4, None, 0.0, 0.0)}
    after = {"summary": _summary(4, 0.975, 0.75, 0.25)}
    assert before_after_table(before, after) == "\n".join([
        "| held-out tasks | model | parse rate | answer EM with tools | answer EM without tools |",
        "|---|---|---:|---:|---:|",
        "| all (4) | pretrained | - | 0% | 0% |",
        "| all (4) | fine-tuned | 98% | 75% | 25% |",
        "| arithmetic (4) | pretrained | - | 0% | 0% |",
        "| arithmetic (4) | fine-tuned | 98% | 75% | 25% |"])


def test_an_episode_runs_the_real_agent_loop_and_prints_as_a_transcript(chat_tok):
    """A scripted model writes the task's call and answer: the call runs on the task's tool, the
    transcript records it, and the demo prints it as written here."""
    from glmkit.chat.agent import ScriptedModel
    from glmkit.eval.tooldemo import ToolStage, episode, format_transcript
    from glmkit.eval.tooltasks import ExactPython, ToolSuite
    from glmkit.infer.engine import Engine
    task = ToolSuite(per_split={"train": 0, "heldout": 1}, families=("arithmetic",), langs=("en",)).tasks("heldout")[0]
    code = task.calls[0].args["code"]
    script = ScriptedModel.from_texts(chat_tok, [
        f"<think></think>\n<tool_call>python\n<arg_key>code</arg_key>\n<arg_value>{code}</arg_value>\n"
        "</tool_call><|observation|>",
        f"<think></think>\nIt is {task.answer}.<|user|>"])
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name("tiny", vocab_size=len(chat_tok), max_position_embeddings=2048)).eval()
    events = episode(Engine(model, chat_tok, max_batch=1, max_len=2048), chat_tok, task, ToolStage(max_new_tokens=64),
                     store=None, python=ExactPython(), logits_processor=script, clock=lambda: 0.0)
    assert format_transcript(events) == "\n".join([
        f"user       {task.question}",
        f"call       python(code={json.dumps(code)})",
        f"result     {task.answer}",
        f"assistant  It is {task.answer}.",
        "(end: answer, 2 rounds, 1 calls)"])
