"""Chat formats: literal renderings of glm4 and glm45 conversations (the bytes GLM-4-9B-chat's and
GLM-4.5's published templates give, DESIGN.md §5), fine-tuning labels, no structural token ever made
from text, glmkit's Jinja templates through HF transformers, message validation."""

import json

import pytest
from helpers import (
    CONVERSATIONS,
    GLM4_TOOLS,
    SEARCH,
    TOOL,
    WEATHER,
    call,
    conversations,
    openai_with_parsed_arguments,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmkit.chat import (
    MessageError,
    chat_template,
    messages_from_dicts,
    render,
    render_text,
    stop_ids,
    tools_from_dicts,
)
from glmkit.chat.glm4 import STRUCTURE as GLM4_STRUCTURE
from glmkit.chat.glm45 import STRUCTURE as GLM45_STRUCTURE
from glmkit.data.tokenizer import GLM45_TOKENS
from glmkit.errors import GlmkitError

# ---------------------------------------------------------------------------- literal renderings
GLM4_TOOLS_HEAD = ("<|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                   "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_WEATHER = ('\n## get_weather\n\n{\n    "name": "get_weather",\n    "description": "查询天气",\n'
                '    "parameters": {\n        "type": "object",\n        "properties": {\n'
                '            "city": {\n                "type": "string"\n            },\n'
                '            "days": {\n                "type": "integer"\n            }\n        },\n'
                '        "required": [\n            "city"\n        ]\n    }\n}\n'
                '在调用上述函数时，请使用 Json 格式表示调用的参数。')
GLM4_SEARCH = ('\n## search\n\n{\n    "name": "search",\n    "description": "Search the web.",\n'
               '    "parameters": {\n        "type": "object",\n        "properties": {\n'
               '            "q": {\n                "type": "string"\n            },\n'
               '            "opts": {\n                "type": "object"\n            },\n'
               '            "exact": {\n                "type": "boolean"\n            }\n        }\n    }\n}\n'
               '在调用上述函数时，请使用 Json 格式表示调用的参数。')
GLM4_PYTHON = ("\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook "
               "环境中执行。\n`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n`/mnt/data` 将会持久化存储你的文件。"
               "在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。")
GLM4_BROWSER = ("\n## simple_browser\n\n你可以使用 `simple_browser` 工具。该工具支持以下函数：\n`search(query: str, "
                "recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
                "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，"
                "同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
                "`open_url(url: str)`：打开指定的 URL。\n\n使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
                "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
                "3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
                "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。")
GLM45_TOOLS_HEAD = ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
GLM45_WEATHER = ('{"type": "function", "function": {"name": "get_weather", "description": "查询天气", "parameters": '
                 '{"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
                 '"required": ["city"]}}}\n')
GLM45_SEARCH = ('{"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": '
                '{"type": "object", "properties": {"q": {"type": "string"}, "opts": {"type": "object"}, '
                '"exact": {"type": "boolean"}}}}}\n')
GLM45_TOOLS_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments within the following "
                    "XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}"
                    "</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")

EXPECTED = {
    ("plain", "glm4", True): (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello!\nHow can I help?"
        "<|user|>\n你好，北京天气怎么样？<|assistant|>"),
    ("plain", "glm45", True): (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello!\nHow can I help?"
        "<|user|>\n你好，北京天气怎么样？<|assistant|>"),
    ("plain", "glm45", False): (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi/nothink<|assistant|>\n<think></think>\nHello!\nHow can I help?"
        "<|user|>\n你好，北京天气怎么样？/nothink<|assistant|>\n<think></think>"),
    ("call", "glm4", True): (
        "[gMASK]<sop>" + GLM4_TOOLS_HEAD + GLM4_WEATHER + "<|user|>\nWeather in Beijing?"
        '<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n{"temp": 3}<|assistant|>'),
    ("call", "glm45", True): (
        "[gMASK]<sop>" + GLM45_TOOLS_HEAD + GLM45_WEATHER + GLM45_TOOLS_TAIL + "<|user|>\nWeather in Beijing?"
        "<|assistant|>\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
        '</tool_call><|observation|>\n<tool_response>\n{"temp": 3}\n</tool_response><|assistant|>'),
    ("parallel", "glm4", True): (
        "[gMASK]<sop>" + GLM4_TOOLS_HEAD + GLM4_WEATHER + "<|system|>\n简短回答。<|user|>\n北京和上海的天气？"
        '<|assistant|>\n我来查一下。<|assistant|>get_weather\n{"city": "北京"}'
        '<|assistant|>get_weather\n{"city": "上海", "days": 2}<|observation|>\n晴，3°C<|observation|>\n雨，9°C'
        "<|assistant|>\n北京晴，上海有雨。<|assistant|>"),
    ("parallel", "glm45", True): (
        "[gMASK]<sop>" + GLM45_TOOLS_HEAD + GLM45_WEATHER + GLM45_TOOLS_TAIL + "<|system|>\n简短回答。"
        "<|user|>\n北京和上海的天气？<|assistant|>\n<think></think>\n我来查一下。"
        "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>"
        "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>上海</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
        "<|observation|>\n<tool_response>\n晴，3°C\n</tool_response>\n<tool_response>\n雨，9°C\n</tool_response>"
        "<|assistant|>\n<think>Both answered.</think>\n北京晴，上海有雨。<|assistant|>"),
    ("thinking", "glm4", True): (
        "[gMASK]<sop>" + GLM4_TOOLS_HEAD + GLM4_WEATHER + GLM4_SEARCH + "<|user|>\n2+2?<|assistant|>\n4"
        "<|user|>\nSearch for it<|assistant|>\n<think>\nLet me search.\n</think>\n\nSearching.  "
        '<|assistant|>search\n{"q": "2+2", "opts": {"n": [1, 2.5, true, null]}, "exact": false}'
        "<|observation|>\n4<|assistant|>\nIt is 4.<|assistant|>"),
    ("thinking", "glm45", True): (
        "[gMASK]<sop>" + GLM45_TOOLS_HEAD + GLM45_WEATHER + GLM45_SEARCH + GLM45_TOOLS_TAIL +
        "<|user|>\n2+2?<|assistant|>\n<think></think>\n4<|user|>\nSearch for it"
        "<|assistant|>\n<think>Let me search.</think>\nSearching.\n<tool_call>search\n"
        "<arg_key>q</arg_key>\n<arg_value>2+2</arg_value>\n<arg_key>opts</arg_key>\n"
        '<arg_value>{"n": [1, 2.5, true, null]}</arg_value>\n<arg_key>exact</arg_key>\n<arg_value>false</arg_value>\n'
        "</tool_call><|observation|>\n<tool_response>\n4\n</tool_response>"
        "<|assistant|>\n<think>The search agrees.</think>\nIt is 4.<|assistant|>"),
    ("thinking", "glm45", False): (
        "[gMASK]<sop>" + GLM45_TOOLS_HEAD + GLM45_WEATHER + GLM45_SEARCH + GLM45_TOOLS_TAIL +
        "<|user|>\n2+2?/nothink<|assistant|>\n<think></think>\n4<|user|>\nSearch for it/nothink"
        "<|assistant|>\n<think>Let me search.</think>\nSearching.\n<tool_call>search\n"
        "<arg_key>q</arg_key>\n<arg_value>2+2</arg_value>\n<arg_key>opts</arg_key>\n"
        '<arg_value>{"n": [1, 2.5, true, null]}</arg_value>\n<arg_key>exact</arg_key>\n<arg_value>false</arg_value>\n'
        "</tool_call><|observation|>\n<tool_response>\n4\n</tool_response>"
        "<|assistant|>\n<think>The search agrees.</think>\nIt is 4.<|assistant|>\n<think></think>"),
    ("python", "glm4", True): (
        "[gMASK]<sop>" + GLM4_TOOLS_HEAD + GLM4_PYTHON + GLM4_WEATHER + "<|user|>\nπ?<|assistant|>python\n"
        "import math\nprint(math.pi)<|observation|>\n3.141592653589793<|assistant|>\nπ ≈ 3.14159<|assistant|>"),
    ("browser", "glm4", True): (
        "[gMASK]<sop>" + GLM4_TOOLS_HEAD + GLM4_BROWSER + "<|user|>\n北京天气<|assistant|>simple_browser\n"
        'search("北京天气")<|observation|>\n # 【0†北京天气†weather.cn】\n晴，3°C<|assistant|>\n北京今天晴【0†weather.cn】。'
        "<|assistant|>"),
}

SPELLS_SPECIAL = {("thinking", "glm4", True)}  # message text holding "<think>", kept as characters


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_literal_renderings(case, chat_tok):
    name, fmt, thinking = case
    messages, tools, _ = CONVERSATIONS[name]
    text = render_text(messages, tools, fmt, enable_thinking=thinking)
    assert text == EXPECTED[case]
    rendered = render(messages, tools, fmt, tokenizer=chat_tok, enable_thinking=thinking)
    assert chat_tok.decode(rendered.ids) == text
    # HF-style tokenization of the text (specials matched) gives the same ids, except where message
    # text spells a special token: glm4 keeps an assistant's "<think>" as characters
    assert (chat_tok.encode(text, allow_special=True) == rendered.ids) == (case not in SPELLS_SPECIAL)


def test_without_generation_prompt_and_forced_calls():
    messages = [{"role": "user", "content": "Weather in Beijing?"}]
    assert render_text(messages, [WEATHER], "glm4", add_generation_prompt=False).endswith("Weather in Beijing?")
    assert render_text(messages, [WEATHER], "glm4", forced_tool="get_weather").endswith(
        "Weather in Beijing?<|assistant|>get_weather\n")
    assert render_text(messages, [WEATHER], "glm45", forced_tool="get_weather").endswith(
        "Weather in Beijing?<|assistant|>\n<think></think>\n<tool_call>get_weather\n")
    with pytest.raises(MessageError, match="tool_choice: names 'nope'") as e:
        render_text(messages, [WEATHER], "glm4", forced_tool="nope")
    assert e.value.param == "tool_choice"


def test_empty_items_are_not_rendered_in_glm4():
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": ""}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}]
    assert render_text(messages, None, "glm4") == "[gMASK]<sop><|user|>\nHi<|user|>\nab<|assistant|>"
    # glm45 renders an empty user turn, and its system turn, as the published template does
    assert render_text(messages, None, "glm45") == (
        "[gMASK]<sop><|system|>\n<|user|>\nHi<|assistant|>\n<think></think><|user|>\nab<|assistant|>")


def test_stop_ids(chat_tok, glm4_tok):
    for fmt in ("glm4", "glm45"):
        assert stop_ids(fmt, chat_tok) == [chat_tok.eot_id, chat_tok.user_id, chat_tok.observation_id]
    assert stop_ids("glm4", glm4_tok) == [glm4_tok.eot_id, glm4_tok.user_id, glm4_tok.observation_id]


def test_glm45_needs_its_tokens(glm4_tok):
    messages, tools, _ = CONVERSATIONS["call"]
    render(messages, tools, "glm4", tokenizer=glm4_tok)  # GLM-4-9B's layout works for glm4
    with pytest.raises(GlmkitError, match="glm45 chat format needs the special token.*<think>.*fmt='glm4'"):
        render(messages, tools, "glm45", tokenizer=glm4_tok)
    with pytest.raises(GlmkitError, match="unknown chat format 'chatml'"):
        render_text(messages, tools, "chatml")


# ---------------------------------------------------------------------------- labels
def test_labels_cover_assistant_tokens_and_the_token_ending_the_turn(chat_tok):
    messages, tools, _ = CONVERSATIONS["parallel"]
    for fmt, learned in (
            ("glm4", ['\n我来查一下。<|assistant|>get_weather\n{"city": "北京"}<|assistant|>get_weather\n'
                      '{"city": "上海", "days": 2}<|observation|>', "\n北京晴，上海有雨。<|user|>"]),
            ("glm45", ["\n<think></think>\n我来查一下。\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
                       "<arg_value>北京</arg_value>\n</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
                       "<arg_value>上海</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n"
                       "</tool_call><|observation|>", "\n<think>Both answered.</think>\n北京晴，上海有雨。<|user|>"])):
        r = render(messages, tools, fmt, tokenizer=chat_tok, add_generation_prompt=False, close_last_turn=True)
        runs, run = [], []
        for i, label in zip(r.ids, r.labels):
            if label == -100:
                if run:
                    runs.append(chat_tok.decode(run))
                run = []
            else:
                assert label == i
                run.append(i)
        runs.append(chat_tok.decode(run)) if run else None
        assert runs == learned, fmt
        assert r.loss_mask == [label != -100 for label in r.labels]
        # spans: the assistant messages start on their role token, which is never learned
        for m in (2, 5):
            s, e = r.spans[m]
            assert r.ids[s] == chat_tok.assistant_id and r.labels[s] == -100 and r.labels[e] != -100


def test_spans_of_unrendered_messages_are_empty(chat_tok):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    r = render(messages, None, "glm4", tokenizer=chat_tok)
    assert r.spans[0] == (2, 2) and r.spans[1][0] == 2 and r.ids[2] == chat_tok.user_id


# ---------------------------------------------------------------------------- structural tokens from text
def _special_sequence(ids, tok):
    return [i for i in ids if i in tok.special_ids]


@pytest.mark.parametrize("fmt", ["glm4", "glm45"])
def test_no_text_ever_becomes_a_structural_token(fmt, chat_tok):
    """Every structural spelling, typed into every role's text (and into a tool's description and
    an argument's value): the same structural ids as with plain text, the characters kept."""
    spellings = sorted(set(GLM4_STRUCTURE + GLM45_STRUCTURE + GLM45_TOKENS + ("<|endoftext|>", "<|pad|>")))

    def conversation(x: str):
        weather = json.loads(json.dumps(WEATHER))
        weather["function"]["description"] = f"天气{x}"
        return ([{"role": "system", "content": f"sys{x}"}, {"role": "user", "content": f"u{x}"},
                 {"role": "assistant", "content": f"a{x}", "reasoning_content": f"r{x}",
                  "tool_calls": [call(1, "get_weather", {"city": f"c{x}"})]},
                 {"role": "tool", "tool_call_id": "call_1", "content": f"t{x}"}], [weather])

    plain = render(*conversation(""), fmt, tokenizer=chat_tok)
    for s in spellings:
        messages, tools = conversation(s)
        r = render(messages, tools, fmt, tokenizer=chat_tok)
        assert _special_sequence(r.ids, chat_tok) == _special_sequence(plain.ids, chat_tok), s
        assert chat_tok.decode(r.ids) == render_text(messages, tools, fmt), s
        assert chat_tok.decode(r.ids).count(s) >= 5, s


# ---------------------------------------------------------------------------- glmkit's Jinja templates
def _hf(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_jinja_templates_render_the_same_bytes_through_transformers(case, chat_tok):
    name, fmt, thinking = case
    messages, tools, _ = CONVERSATIONS[name]
    hf = _hf(chat_tok)
    kw = {} if thinking else {"enable_thinking": False}
    for gen in (True, False):
        text = hf.apply_chat_template(openai_with_parsed_arguments(messages), tools=tools,
                                      chat_template=chat_template(fmt), tokenize=False, add_generation_prompt=gen,
                                      **kw)
        assert text == render_text(messages, tools, fmt, add_generation_prompt=gen, enable_thinking=thinking)
        ids = hf.apply_chat_template(openai_with_parsed_arguments(messages), tools=tools,
                                     chat_template=chat_template(fmt), tokenize=True, add_generation_prompt=gen,
                                     return_dict=False, **kw)
        ours = render(messages, tools, fmt, tokenizer=chat_tok, add_generation_prompt=gen, enable_thinking=thinking)
        # HF's tokenizer makes a structural token of message text spelling one; glmkit never does
        assert (list(ids) == ours.ids) == (case not in SPELLS_SPECIAL)


@pytest.mark.parametrize("fmt", ["glm4", "glm45"])
def test_jinja_templates_match_on_random_conversations(fmt, chat_tok):
    hf = _hf(chat_tok)
    tools = GLM4_TOOLS if fmt == "glm4" else [TOOL]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conversations(fmt, think_close=True), st.booleans(), st.booleans())
    def run(messages, gen, thinking):
        text = hf.apply_chat_template(openai_with_parsed_arguments(messages), tools=tools, tokenize=False,
                                      chat_template=chat_template(fmt), add_generation_prompt=gen,
                                      enable_thinking=thinking)
        assert text == render_text(messages, tools, fmt, add_generation_prompt=gen, enable_thinking=thinking)

    run()


def test_jinja_glm4_template_takes_string_arguments_as_given():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call(1, "get_weather", {"city": "北京"})]}]
    text = hf.apply_chat_template(messages, chat_template=chat_template("glm4"), tokenize=False)
    assert text == render_text(messages, None, "glm4", add_generation_prompt=False)
    with pytest.raises(Exception, match="arguments must be a mapping"):
        hf.apply_chat_template(messages, chat_template=chat_template("glm45"), tokenize=False)


# ---------------------------------------------------------------------------- messages
def test_messages_round_trip_to_dict():
    for messages, tools, _ in CONVERSATIONS.values():
        assert [m.to_dict() for m in messages_from_dicts(messages)] == [
            {"content": None, **m} if m["role"] == "assistant" else m for m in messages]
        assert [t.to_dict() for t in tools_from_dicts(tools)] == (tools or [])


@pytest.mark.parametrize("messages, param, problem", [
    ([{"role": "bot", "content": "x"}], "messages[0].role", "must be one of"),
    ([{"role": "user"}], "messages[0].content", "is required"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]",
     "only text parts"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "must be a string, got missing"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                            "function": {"name": "f", "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments", "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                            "function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[0].tool_calls[0].function.arguments", "must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f g", "arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name", "not a valid function name"),
    ("hello", "messages", "must be a list"),
])
def test_bad_messages_name_the_field(messages, param, problem):
    with pytest.raises(MessageError, match=problem) as e:
        render_text(messages, None, "glm4")
    assert e.value.param == param and str(e.value).startswith(param)


@pytest.mark.parametrize("tools, param", [
    ([{"type": "retrieval"}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": "a.b"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "a", "parameters": "x"}}], "tools[0].function.parameters"),
    ([WEATHER, SEARCH, WEATHER], "tools[2]"),
])
def test_bad_tools_name_the_field(tools, param):
    with pytest.raises(MessageError) as e:
        render_text([{"role": "user", "content": "x"}], tools, "glm45")
    assert e.value.param == param
