"""Tool-use evaluation (glmkit/eval/tooleval.py) on the real engine, agent loop and tools, with scripted
models: each episode's replies are forced token ids, so every metric has an exact expected value."""

import json
import re

import pytest
from helpers import tiny_model

from glmkit.chat.agent import ScriptedModel
from glmkit.chat.docstore import build_store
from glmkit.cli import main
from glmkit.errors import GlmkitError
from glmkit.eval.tooleval import evaluate_tools, format_comparison, metrics, read_tasks, score_episode
from glmkit.eval.toolsft import conversation, task_record, write_jsonl
from glmkit.eval.tooltasks import ExactPython, ToolSuite
from glmkit.infer.engine import Engine


@pytest.fixture(scope="module")
def engine(chat_tok):
    model = tiny_model(vocab_size=len(chat_tok), max_position_embeddings=4096)
    return Engine(model, chat_tok, max_batch=4, max_len=4096)


@pytest.fixture(scope="module")
def suite():
    return ToolSuite(seed=0, per_split={"train": 0, "heldout": 1})     # one task per family and language


@pytest.fixture(scope="module")
def store(suite, tmp_path_factory):
    return build_store(suite.documents(), tmp_path_factory.mktemp("facts") / "facts.sqlite")


def glm45_reply(calls=(), content=None, stop="<|observation|>"):
    """What a GLM-4.5 model writes after `<|assistant|>`: calls as (name, arguments), or content."""
    text = "\n<think></think>"
    if content is not None:
        text += "\n" + content
    for name, args in calls:
        text += f"\n<tool_call>{name}\n" + "".join(
            f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
            for k, v in args.items()) + "</tool_call>"
    return text + stop


def glm4_reply(calls=(), content=None, stop="<|observation|>"):
    if content is not None:
        return "\n" + content + stop
    blocks = []
    for name, args in calls:
        body = args["code"] if name == "python" else args["command"] if name == "simple_browser" else \
            json.dumps(args, ensure_ascii=False)
        blocks.append(f"{name}\n{body}")
    return "<|assistant|>".join(blocks) + stop


def perfect_replies(task, dialect, store):
    """The replies of an episode that does exactly what the suite's SFT conversation does."""
    messages = conversation(task, dialect, store=store, python=ExactPython())["messages"]
    reply = glm45_reply if dialect == "glm45" else glm4_reply
    out = []
    for m in messages:
        if m["role"] != "assistant":
            continue
        if m.get("tool_calls"):
            out.append(reply([(c["function"]["name"], json.loads(c["function"]["arguments"]))
                              for c in m["tool_calls"]]))
        else:
            out.append(reply(content=m["content"], stop="<|user|>"))
    return out


def scripted(tok, scripts):
    """logits_processor for evaluate_tools: `scripts(task, tools)` -> the episode's reply texts."""
    return lambda task, tools: ScriptedModel.from_texts(tok, scripts(task, tools))


def run(engine, tok, tasks, scripts, store, **kw):
    return evaluate_tools(engine, tok, tasks, store=store, logits_processor=scripted(tok, scripts),
                          max_new_tokens=200, **kw)


def test_a_perfect_model_scores_one_and_the_head_only_knows_arithmetic(engine, chat_tok, suite, store):
    tasks = suite.tasks("heldout")
    assert [t.family for t in tasks] == ["arithmetic", "counting", "lookup", "functions"] * 2
    perfect = {t.id: perfect_replies(t, "glm45", store) for t in tasks}
    report = run(engine, chat_tok, tasks, lambda t, tools: perfect[t.id], store)
    head = lambda t, tools: [glm45_reply(content=t.answer if t.family == "arithmetic" else "I do not know.",  # noqa: E731
                                         stop="<|user|>")]
    report += run(engine, chat_tok, tasks, head, store, tools=False)
    s = report.summary()
    overall = {k: s[k] for k in ("tasks", "parse_rate", "tool_name_accuracy", "argument_exact_match", "over_calling",
                                 "under_calling", "answer_em_with_tools", "answer_em_without_tools", "calls_per_task",
                                 "rounds_per_task")}
    assert overall == {"tasks": 8, "parse_rate": 1.0, "tool_name_accuracy": 1.0, "argument_exact_match": 1.0,
                       "over_calling": 0.0, "under_calling": 0.0, "answer_em_with_tools": 1.0,
                       "answer_em_without_tools": 0.25, "calls_per_task": 1.25, "rounds_per_task": 2.25}
    assert s["episodes"] == 16
    assert {f: (m["answer_em_with_tools"], m["answer_em_without_tools"], m["calls_per_task"], m["tasks"])
            for f, m in s["families"].items()} == {
        "arithmetic": (1.0, 1.0, 1.0, 2), "counting": (1.0, 0.0, 1.0, 2), "lookup": (1.0, 0.0, 2.0, 2),
        "functions": (1.0, 0.0, 1.0, 2)}
    assert {lang: (m["answer_em_without_tools"], m["tasks"]) for lang, m in s["langs"].items()} == {
        "en": (0.25, 4), "zh": (0.25, 4)}
    lookup = [e for e in report.episodes if e.task.family == "lookup" and e.tools]
    assert [(e.end, e.rounds, [n for n, _ in e.calls]) for e in lookup] == [
        ("answer", 3, ["browser_search", "browser_open"])] * 2
    assert [e.task.id for e in report.episodes] == [t.id for t in tasks] * 2        # task order, tools first
    table = report.format_table().splitlines()
    assert table[0] == "| | tasks | parse | name | args | over | under | EM tools | EM none | calls |"
    assert table[2] == "| all | 8 | 100.0% | 100.0% | 100.0% | 0.0% | 0.0% | 100.0% | 25.0% | 1.25 |"
    assert [r.split(" | ")[0] for r in table[2:]] == ["| all", "| arithmetic", "| counting", "| lookup",
                                                       "| functions", "| en", "| zh"]


def test_the_glm4_dialect_scores_the_same_perfect_episodes(engine, chat_tok, suite, store):
    tasks = suite.tasks("heldout")[:4]
    perfect = {t.id: perfect_replies(t, "glm4", store) for t in tasks}
    s = run(engine, chat_tok, tasks, lambda t, tools: perfect[t.id], store, fmt="glm4").summary()
    assert (s["parse_rate"], s["argument_exact_match"], s["answer_em_with_tools"], s["calls_per_task"]) == \
        (1.0, 1.0, 1.0, 1.25)


def test_answering_without_the_call_is_under_calling(engine, chat_tok, suite, store):
    tasks = suite.tasks("heldout")
    report = run(engine, chat_tok, tasks, lambda t, tools: [glm45_reply(content="No idea.", stop="<|user|>")], store)
    perfect = {t.id: perfect_replies(t, "glm45", store) for t in tasks[:2]}
    sft = run(engine, chat_tok, tasks[:2], lambda t, tools: perfect[t.id], store)
    assert format_comparison({"untuned": report, "SFT": sft}).splitlines() == [
        "| model | parse | name | args | EM tools | EM none | arithmetic (tools / none) | counting (tools / none) "
        "| lookup (tools / none) | functions (tools / none) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| untuned | - | 0.0% | 0.0% | 0.0% | - | 0.0% / - | 0.0% / - | 0.0% / - | 0.0% / - |",
        "| SFT | 100.0% | 100.0% | 100.0% | 100.0% | - | 100.0% / - | 100.0% / - | - | - |"]
    s = report.summary()
    assert (s["parse_rate"], s["tool_name_accuracy"], s["argument_exact_match"], s["over_calling"],
            s["under_calling"], s["answer_em_with_tools"], s["answer_em_without_tools"], s["calls_per_task"],
            s["rounds_per_task"]) == (None, 0.0, 0.0, 0.0, 1.0, 0.0, None, 0.0, 1.0)
    assert "| all | 8 | - | 0.0% | 0.0% | 0.0% | 100.0% | 0.0% | - | 0.00 |" in report.format_table()


def test_malformed_calls_lower_the_parse_rate(engine, chat_tok, suite, store):
    tasks = [t for t in suite.tasks("heldout") if t.family in ("arithmetic", "functions")]
    arithmetic_en, functions_en, arithmetic_zh, functions_zh = tasks
    good = perfect_replies(arithmetic_en, "glm45", store)
    name, args = functions_en.calls[0].tool, functions_en.calls[0].args
    key = next(iter(args))
    scripts = {
        arithmetic_en.id: good,                                                        # 1 call, parsed
        # the right call with its first <arg_value> left open: a call the parser reports a fault in
        functions_en.id: [f"\n<think></think>\n<tool_call>{name}\n<arg_key>{key}</arg_key>\n<arg_value>"
                          f"{args[key]}</tool_call><|observation|>", glm45_reply(content=functions_en.answer,
                                                                                 stop="<|user|>")],
        # an undeclared tool: rejected, the reply kept as text, the loop goes on
        arithmetic_zh.id: [glm45_reply([("calculator", {"code": "1 + 1"})]),
                           glm45_reply(content=arithmetic_zh.answer, stop="<|user|>")],
        functions_zh.id: perfect_replies(functions_zh, "glm45", store),              # 1 call, parsed
    }
    report = run(engine, chat_tok, tasks, lambda t, tools: scripts[t.id], store)
    by = {e.task.id: e for e in report.episodes}
    assert [(by[t.id].attempts, by[t.id].parse_failures, by[t.id].rounds, by[t.id].answer_ok) for t in tasks] == [
        (1, 0, 2, True), (1, 1, 2, True), (1, 1, 2, True), (1, 0, 2, True)]
    assert (by[functions_en.id].names_ok, by[functions_en.id].args_ok) == (True, False)
    assert (by[arithmetic_zh.id].names_ok, by[arithmetic_zh.id].args_ok) == (False, False)
    s = report.summary()
    assert (s["parse_rate"], s["tool_name_accuracy"], s["argument_exact_match"], s["under_calling"],
            s["over_calling"]) == (0.5, 0.75, 0.5, 0.0, 0.0)
    assert s["families"]["functions"]["parse_rate"] == 0.5 and s["langs"]["zh"]["parse_rate"] == 0.5


def test_wrong_arguments_and_calling_twice(engine, chat_tok, suite, store):
    functions = [t for t in suite.tasks("heldout") if t.family == "functions"]
    arithmetic = [t for t in suite.tasks("heldout") if t.family == "arithmetic"]

    def scripts(task, tools):
        call = task.calls[0]
        if task.family == "functions":           # right function, one argument changed; the answer right anyway
            args = dict(call.args)
            k = next(iter(args))
            args[k] = "2001-01-01" if "start" in args else ("Nowhere" if k == "city" else 999)
            return [glm45_reply([(call.tool, args)]), glm45_reply(content=task.answer, stop="<|user|>")]
        return [glm45_reply([("python", call.args)]), glm45_reply([("python", call.args)]),
                glm45_reply(content=task.answer, stop="<|user|>")]

    report = run(engine, chat_tok, functions + arithmetic, scripts, store)
    s = report.summary()
    assert (s["families"]["functions"]["tool_name_accuracy"], s["families"]["functions"]["argument_exact_match"],
            s["families"]["functions"]["answer_em_with_tools"]) == (1.0, 0.0, 1.0)
    a = s["families"]["arithmetic"]
    assert (a["tool_name_accuracy"], a["over_calling"], a["under_calling"], a["calls_per_task"],
            a["rounds_per_task"], a["answer_em_with_tools"], a["parse_rate"]) == (0.0, 1.0, 0.0, 2.0, 3.0, 1.0, 1.0)


def test_python_arguments_are_judged_by_what_the_code_returned(engine, chat_tok, suite, store):
    """Valid Python that computes something else is a wrong argument; another expression of the same
    value is a right one (the episode's own tool results decide, through the real agent loop)."""
    arithmetic = [t for t in suite.tasks("heldout") if t.family == "arithmetic"]
    first, second = arithmetic[:2]
    a, b, c = (int(x) for x in first.key.split(":")[2:])
    same = {"mul_add": f"{b} * {a} + {c}", "mul_sub": f"{b} * {a} - {c}", "sum_mul": f"{c} * ({b} + {a})",
            "mul3": f"{c} * {b} * {a}"}[first.key.split(":")[1]]
    codes = {first.id: same, second.id: "0 + + + 20"}

    def scripts(task, tools):
        return [glm45_reply([("python", {"code": codes[task.id]})]), glm45_reply(content=task.answer, stop="<|user|>")]

    report = run(engine, chat_tok, [first, second], scripts, store)
    by = {e.task.id: e for e in report.episodes if e.tools}
    assert [(by[t.id].names_ok, by[t.id].args_ok, by[t.id].answer_ok) for t in (first, second)] == [
        (True, True, True), (True, False, True)]
    assert report.summary()["argument_exact_match"] == 0.5


def test_a_lookup_answer_must_cite_the_document_shown(engine, chat_tok, suite, store):
    lookup = [t for t in suite.tasks("heldout") if t.family == "lookup"]

    def scripts(task, tools):
        replies = perfect_replies(task, "glm45", store)
        last = replies[-1]
        if task.lang == "en":        # the right fact, cited under an id the browser never showed
            return replies[:-1] + [re.sub(r"【\d+†", "【7†", last)]
        return replies[:-1] + [glm45_reply(content=task.quote, stop="<|user|>")]  # the right fact, no citation

    report = run(engine, chat_tok, lookup, scripts, store)
    assert [(e.end, e.names_ok, e.answer_ok) for e in report.episodes] == [("answer", True, False)] * 2


def test_concurrent_episodes_equal_sequential_ones(engine, chat_tok, suite, store):
    tasks = suite.tasks("heldout")
    perfect = {t.id: perfect_replies(t, "glm45", store) for t in tasks}
    one = run(engine, chat_tok, tasks, lambda t, tools: perfect[t.id], store, concurrency=1, clock=lambda: 0.0)
    four = run(engine, chat_tok, tasks, lambda t, tools: perfect[t.id], store, concurrency=4, clock=lambda: 0.0)
    assert [e.to_dict() for e in one.episodes] == [e.to_dict() for e in four.episodes]   # transcripts included


def test_rescoring_a_transcript_and_reading_tasks_back(engine, chat_tok, suite, store, tmp_path):
    tasks = suite.tasks("heldout")
    perfect = {t.id: perfect_replies(t, "glm45", store) for t in tasks}
    report = run(engine, chat_tok, tasks, lambda t, tools: perfect[t.id], store, concurrency=2)
    path = report.write_transcripts(tmp_path / "t.jsonl")
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert [x["task"] for x in lines] == [t.id for t in tasks]
    again = [score_episode(t, x["events"], tools=True) for t, x in zip(tasks, lines)]
    assert metrics(again) == metrics(report.episodes)
    write_jsonl(map(task_record, tasks), tmp_path / "heldout_tasks.jsonl")
    back = read_tasks(tmp_path / "heldout_tasks.jsonl")
    assert [(t.id, t.answer, t.calls, t.source) for t in back] == [(t.id, t.answer, t.calls, t.source) for t in tasks]


def test_bad_arguments_are_refused_before_any_episode(engine, chat_tok, suite, tmp_path):
    tasks = suite.tasks("heldout")
    with pytest.raises(GlmkitError, match="document store"):
        evaluate_tools(engine, chat_tok, tasks)
    with pytest.raises(GlmkitError, match="toolset"):
        evaluate_tools(engine, chat_tok, tasks, toolset="some")
    (tmp_path / "tasks.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(GlmkitError, match="tasks.jsonl:1: not a task record"):
        read_tasks(tmp_path / "tasks.jsonl")


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def checkpoint(chat_tok, tmp_path_factory):
    """A tiny random GLM saved as a `glmkit sft --chat-format glm45` run would record it."""
    from glmkit.checkpoint import store as ckpt_io
    model = tiny_model(vocab_size=chat_tok.vocab_size, max_position_embeddings=4096)
    return ckpt_io.save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "checkpoints", 1, model_state=model.state_dict(),
        save_config=model.config.save, save_tokenizer=lambda p: chat_tok.save(p.parent), train_state={"step": 1},
        fingerprint={"objective": {"kind": "glm", "chat": "glm45"}, "tokenizer": chat_tok.hash}, keep=1)


def test_the_command_on_a_random_model_prints_the_table_and_one_json_line(checkpoint, tmp_path, capsys):
    out, transcripts = tmp_path / "report.json", tmp_path / "episodes.jsonl"
    argv = ["eval", "tools", str(checkpoint), "--count", "1", "--families", "arithmetic,functions", "--python",
            "exact", "--max-new-tokens", "6", "--max-rounds", "2", "--concurrency", "4", "--out", str(out),
            "--transcripts", str(transcripts)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {"parse_rate", "answer_em_with_tools", "answer_em_without_tools", "tool_name_accuracy",
            "argument_exact_match", "over_calling", "under_calling", "calls_per_task", "families",
            "langs"} <= set(summary)
    assert (summary["tasks"], summary["episodes"], summary["format"]) == (4, 8, "glm45")
    assert list(summary["families"]) == ["arithmetic", "functions"] and list(summary["langs"]) == ["en", "zh"]
    assert summary["answer_em_with_tools"] == 0.0 and summary["answer_em_without_tools"] == 0.0
    assert lines[0] == "| | tasks | parse | name | args | over | under | EM tools | EM none | calls |"
    assert "format glm45; 4 held-out tasks" in captured.err and captured.err.count("] arithmetic-") == 4
    record = json.loads(out.read_text())
    assert record["summary"] == summary and len(record["episodes"]) == 8
    episodes = [json.loads(x) for x in transcripts.read_text().splitlines()]
    assert [e["tools"] for e in episodes] == [True] * 4 + [False] * 4
    assert all(e["events"][0]["event"] == "user" and e["events"][-1]["event"] == "end" for e in episodes)


def test_the_command_with_a_perfect_scripted_model(checkpoint, chat_tok, tmp_path, capsys):
    from glmkit.cli import verb_parser
    from glmkit.cli.eval_tools import run as run_command
    from glmkit.eval.toolsft import write_suite
    suite = ToolSuite(seed=3, per_split={"train": 2, "heldout": 1}, families=("arithmetic", "lookup"))
    write_suite(suite, tmp_path / "suite", "glm45")
    store = build_store(suite.documents(), tmp_path / "facts.sqlite")
    tasks = {t.id: t for t in suite.tasks("heldout")}
    replies = {i: perfect_replies(t, "glm45", store) for i, t in tasks.items()}
    args = verb_parser("eval tools").parse_args([str(checkpoint), "--suite", str(tmp_path / "suite"),
                                                 "--python", "exact", "--no-without-tools"])
    assert run_command(args, logits_processor=scripted(chat_tok, lambda t, tools: replies[t.id])) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("tasks", "parse_rate", "answer_em_with_tools", "answer_em_without_tools",
                                    "calls_per_task")} == {"tasks": 4, "parse_rate": 1.0, "answer_em_with_tools": 1.0,
                                                           "answer_em_without_tools": None, "calls_per_task": 1.5}
