"""The tool-use task suite: answers recomputed independently of the generators, disjoint splits, checkers on
exact cases, and SFT conversations played out on the real tools that round-trip through the message model."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from glmkit.chat.docstore import build_store
from glmkit.chat.render import render, render_text
from glmkit.chat.sandbox import Sandbox, sandbox_problem
from glmkit.errors import GlmkitError
from glmkit.eval.toolsft import conversation, conversations, read_jsonl, write_jsonl
from glmkit.eval.tooltasks import (
    FAMILIES,
    LANGS,
    ExactPython,
    ToolSuite,
    check_answer,
    check_calls,
    cited_sources,
    split_of,
)

SUITE = ToolSuite(seed=3, per_split={"train": 12, "heldout": 6})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(SUITE.documents(), tmp_path_factory.mktemp("facts") / "facts.sqlite")


def _rates():  # units per US dollar, written out again here
    return {"USD": "1", "EUR": "0.92", "GBP": "0.79", "CNY": "7.24", "JPY": "151"}


def recompute(task, documents) -> str:
    """The answer from the question's text (and the store's documents), without the generators' code."""
    q = task.question
    if task.family == "arithmetic":
        expr = re.search(r"(?:What is |请计算 )(.+?)(?:\?| 的值。)", q).group(1)
        return str(eval(expr.replace("×", "*").replace("−", "-")))  # digits, + - * ( ) only
    if task.family == "counting":
        text, unit = (re.search(r"'(.)' appear in \"(.+)\"", q).group(2, 1) if task.lang == "en"
                      else re.search(r"“(.+)”中有几个“(.)”字", q).group(1, 2))
        return str(sum(ch == unit for ch in text))
    if task.family == "lookup":
        name = re.search(r"(?:the )?(\S+ \S+?)(?: founded\?|\?| employ\?|建于|的创建者|现有)", q).group(1) \
            if task.lang == "en" else re.match(r"(.+?)(?:建于|的创建者|现有)", q).group(1)
        text = next(t for title, _, t in documents if title == name)
        patterns = {"en": [r"founded in (\d+)\.", r"founder was (.+)\.", r"employs (\d+) people"],
                    "zh": [r"始建于(\d+)年", r"创建者是(.+)。", r"现有员工(\d+)人"]}[task.lang]
        which = 0 if ("year" in q or "建于" in q) else 1 if ("Who" in q or "创建者" in q) else 2
        return re.search(patterns[which], text).group(1)
    name, args = task.calls[0].tool, task.calls[0].args
    if name == "days_between":
        d = re.findall(r"\d{4}-\d{2}-\d{2}", q)
        return str((datetime.date.fromisoformat(d[1]) - datetime.date.fromisoformat(d[0])).days)
    if name == "get_weather":
        digest = hashlib.sha256(args["city"].encode()).digest()
        return str(digest[args["days"] - 1] % 41 - 10)
    r = _rates()
    usd = Decimal(args["amount"]) / Decimal(r[args["source"]])
    return str((usd * Decimal(r[args["target"]])).quantize(Decimal("0.01"), ROUND_HALF_EVEN))


def test_every_family_and_language_is_drawn_with_answers_recomputed():
    documents = SUITE.documents()
    for split, n in (("train", 12), ("heldout", 6)):
        tasks = SUITE.tasks(split)
        assert len(tasks) == n * len(FAMILIES) * len(LANGS)
        for family in FAMILIES:
            for lang in LANGS:
                assert sum(t.family == family and t.lang == lang for t in tasks) == n
        for t in tasks:
            assert recompute(t, documents) == t.answer, t


def test_splits_are_disjoint_by_construction():
    train, heldout = SUITE.tasks("train"), SUITE.tasks("heldout")
    assert {t.key for t in train}.isdisjoint({t.key for t in heldout})
    assert all(split_of(t.key) == t.split for t in train + heldout)
    assert len({t.key for t in train}) == len(train) and len({t.id for t in train + heldout}) == len(train + heldout)
    other = ToolSuite(seed=4, per_split={"train": 0, "heldout": 12})  # another seed's held-out tasks
    assert {t.key for t in train}.isdisjoint({t.key for t in other.tasks("heldout")})
    # the held-out places are in the store (answerable) but no train question asks about them
    names = {t.key.split(":", 2)[2] for t in heldout if t.family == "lookup"}
    assert names <= {title for title, _, _ in SUITE.documents()}
    assert not any(n in t.question for t in train for n in names)


def test_a_larger_suite_extends_the_same_tasks():
    small = ToolSuite(seed=3, per_split={"train": 5, "heldout": 2})
    for split in ("train", "heldout"):
        keys = [t.key for t in SUITE.tasks(split)]
        for t in small.tasks(split):
            assert t.key in keys


def test_check_answer_and_calls_on_exact_cases():
    t = next(t for t in SUITE.tasks("train") if t.family == "arithmetic")
    assert check_answer(t, f"The result is {int(t.answer):,}.")
    assert not check_answer(t, f"The result is {int(t.answer) + 1}.")
    assert not check_answer(t, f"{t.answer} is not it; the answer is 12.")  # the last number counts
    code = t.calls[0].args["code"]
    assert check_calls(t, [("python", {"code": code})]) == (True, True)          # run here by ExactPython
    a, b, c = (int(x) for x in t.key.split(":")[2:])
    swapped = {"mul_add": f"{b} * {a} + {c}", "mul_sub": f"{b} * {a} - {c}", "sum_mul": f"{c} * ({b} + {a})",
               "mul3": f"{c} * {b} * {a}"}[t.key.split(":")[1]]
    assert check_calls(t, [("python", {"code": swapped})]) == (True, True)       # another way to the answer
    assert check_calls(t, [("python", {"code": "0 + + + 20"})]) == (True, False)  # valid Python, wrong value
    assert check_calls(t, [("python", {"code": "1 +"})]) == (True, False)
    assert check_calls(t, [("python", {"code": f"print({code})"})]) == (True, False)  # ExactPython cannot run it
    # with what the calls returned (a real interpreter): judged by the result, whatever the code
    assert check_calls(t, [("python", {"code": f"print({code})"})], [f"{t.answer}\n"]) == (True, True)
    assert check_calls(t, [("python", {"code": code})], [str(int(t.answer) + 1)]) == (True, False)
    assert check_calls(t, [("python", {"code": code})], [None]) == (True, False)     # the call never ran
    assert check_calls(t, []) == (False, False)

    f = next(t for t in SUITE.tasks("train") if t.calls[0].tool == "convert_currency")
    args = f.calls[0].args
    assert check_calls(f, [("convert_currency", {**args, "amount": str(args["amount"])})]) == (True, True)
    assert check_calls(f, [("convert_currency", {**args, "amount": args["amount"] + 1})]) == (True, False)
    assert check_calls(f, [("days_between", {"start": "2020-01-01", "end": "2020-02-01"})]) == (False, False)

    look = next(t for t in SUITE.tasks("train") if t.family == "lookup")
    name = look.calls[0].args["query"]
    glm4 = [("simple_browser", {"command": f'search("{name}")'}), ("simple_browser", {"command": "open(2)"})]
    assert check_calls(look, glm4) == (True, True)
    assert check_calls(look, [("browser_search", {"query": "something else"}), ("browser_open", {"id": 0})]) \
        == (True, False)
    assert cited_sources("x 【1†q】 y 【7†q】", [" # 【1†T†facts/en/a】\nsnippet", "TITLE: T 【7†facts/zh/b】"]) \
        == ["facts/en/a", "facts/zh/b"]


@pytest.mark.parametrize("dialect", ["glm4", "glm45"])
def test_conversations_round_trip_and_render(dialect, store, tmp_path, chat_tok):
    tasks = SUITE.tasks("train")
    rows = conversations(tasks, dialect, store=store, python=ExactPython())
    path = write_jsonl(rows, tmp_path / "train.jsonl")
    assert read_jsonl(path) == rows
    for row, task in zip(rows, tasks):
        m = row["messages"]
        assert m[0] == {"role": "user", "content": task.question}
        assert [x["role"] for x in m] == ["user"] + ["assistant", "tool"] * len(task.calls) + ["assistant"]
        assert check_answer(task, m[-1]["content"])
        if task.family in ("arithmetic", "counting"):
            assert m[2]["content"] == task.answer  # the interpreter's value, exactly
        if task.family == "functions":
            assert task.answer in m[2]["content"]
        if task.family == "lookup":
            observations = [x["content"] for x in m if x["role"] == "tool"]
            assert cited_sources(m[-1]["content"], observations) == [task.source]
            assert task.quote in observations[-1]
        rendered = render(m, row["tools"], dialect, tokenizer=chat_tok, add_generation_prompt=False,
                          close_last_turn=True)
        assert chat_tok.decode(rendered.ids).startswith(render_text(m, row["tools"], dialect,
                                                                    add_generation_prompt=False))
    names = {json.dumps(sorted(t.get("function", t).get("name", t.get("type")) for t in r["tools"])) for r in rows}
    expected = {"glm4": [["python"], ["simple_browser"], ["convert_currency", "days_between", "get_weather"]],
                "glm45": [["python"], ["browser_find", "browser_open", "browser_search"],
                          ["convert_currency", "days_between", "get_weather"]]}[dialect]
    assert names == {json.dumps(n) for n in expected}


def test_a_wrong_episode_is_refused(store):
    from dataclasses import replace
    t = next(t for t in SUITE.tasks("train") if t.family == "lookup")
    with pytest.raises(GlmkitError, match="does not cite"):
        conversation(replace(t, source=t.source + "x"), "glm45", store=store, python=ExactPython())
    a = next(t for t in SUITE.tasks("train") if t.family == "arithmetic")
    with pytest.raises(GlmkitError, match="does not state"):
        conversation(replace(a, answer=str(int(a.answer) + 1)), "glm4", python=ExactPython())
    with pytest.raises(GlmkitError, match="needs the python tool"):
        conversation(a, "glm4")
    with pytest.raises(GlmkitError, match="only the task suite's own code"):
        ExactPython().run("__import__('os')")


def test_bad_suite_options_name_the_problem():
    with pytest.raises(GlmkitError, match="unknown task families"):
        ToolSuite(families=("poetry",))
    with pytest.raises(GlmkitError, match="per_split"):
        ToolSuite(per_split={"test": 3})
    with pytest.raises(GlmkitError, match="unknown split"):
        SUITE.tasks("dev")


@pytest.mark.skipif(sandbox_problem() is not None, reason=f"no sandbox on this machine: {sandbox_problem()}")
def test_exact_python_matches_the_sandbox(tmp_path):
    tasks = [t for t in SUITE.tasks("heldout") if t.family in ("arithmetic", "counting")][:6]
    with Sandbox(tmp_path / "ws") as box:
        for t in tasks:
            code = t.calls[0].args["code"]
            assert box.run(code).as_observation() == ExactPython().run(code).as_observation() == t.answer


def test_glmkit_tooltasks_writes_the_suite(tmp_path, capsys):
    from glmkit.chat.docstore import DocStore
    from glmkit.cli import main

    out = tmp_path / "suite"
    assert main(["tooltasks", "--out", str(out), "--format", "glm45", "--train", "2", "--heldout", "1",
                 "--seed", "3"]) == 0
    assert "16 train conversations (glm45)" in capsys.readouterr().out
    rows = read_jsonl(out / "train.jsonl")
    held = [json.loads(line) for line in (out / "heldout_tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and len(held) == 8
    suite = ToolSuite(seed=3, per_split={"train": 2, "heldout": 1})
    assert [h["key"] for h in held] == [t.key for t in suite.tasks("heldout")]
    assert [h["answer"] for h in held] == [t.answer for t in suite.tasks("heldout")]
    lookup = next(h for h in held if h["family"] == "lookup")
    assert any(hit.source == lookup["source"] for hit in DocStore(out / "facts.sqlite").search(lookup["calls"][0]["args"]["query"]))
