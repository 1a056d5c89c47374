"""Rendering with a checkpoint's own chat template (glmkit.chat.template): the same ids and labels as
glmkit's renderers through glmkit's templates, text spelling special tokens kept as characters, the
same ids as HF's apply_chat_template on ordinary text, clear errors."""

import pytest
from helpers import CONVERSATIONS, GLM4_TOOLS, TOOL, WEATHER, conversations, openai_with_parsed_arguments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmkit.chat import MessageError, chat_template, render
from glmkit.chat.template import render_template
from glmkit.errors import GlmkitError


@pytest.mark.parametrize("fmt", ["glm4", "glm45"])
def test_same_ids_and_labels_as_the_renderers(fmt, chat_tok):
    """Random conversations whose texts spell every structural token: the template path keeps them
    as characters exactly where the renderer does."""
    tools = GLM4_TOOLS if fmt == "glm4" else [TOOL]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conversations(fmt), st.booleans(), st.booleans())
    def run(messages, gen, thinking):
        ours = render(messages, tools, fmt, tokenizer=chat_tok, add_generation_prompt=gen, enable_thinking=thinking)
        got = render_template(chat_template(fmt), messages, tools, tokenizer=chat_tok, add_generation_prompt=gen,
                              enable_thinking=thinking)
        assert got.ids == ours.ids and got.labels == ours.labels and got.spans == []

    run()


def test_same_ids_as_hf_on_ordinary_text(chat_tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=chat_tok.backend)
    for name in ("plain", "call", "parallel"):
        messages, tools, _ = CONVERSATIONS[name]
        want = hf.apply_chat_template(openai_with_parsed_arguments(messages), tools=tools, tokenize=True,
                                      chat_template=chat_template("glm45"), add_generation_prompt=True,
                                      return_dict=False)
        assert render_template(chat_template("glm45"), messages, tools, tokenizer=chat_tok).ids == list(want)


def test_the_templates_own_specials_are_tokens_and_the_users_are_text(chat_tok):
    template = "{{ '<|user|>' }}{{ messages[0].content }}{% for t in tools %}[{{ t.function.description }}]{% endfor %}"
    weather = {"type": "function", "function": {**WEATHER["function"], "description": "<tool_call>"}}
    r = render_template(template, [{"role": "user", "content": "<|assistant|>hi"}], [weather], tokenizer=chat_tok)
    assert r.ids == [chat_tok.user_id] + chat_tok.encode("<|assistant|>hi[<tool_call>]")
    assert chat_tok.decode(r.ids) == "<|user|><|assistant|>hi[<tool_call>]"


def test_errors(chat_tok):
    user = [{"role": "user", "content": "x"}]
    with pytest.raises(GlmkitError, match="not valid Jinja"):
        render_template("{% if %}", user, tokenizer=chat_tok)
    with pytest.raises(GlmkitError, match="template failed on this conversation: TemplateError: no system"):
        render_template("{{ raise_exception('no system') }}", user, tokenizer=chat_tok)
    with pytest.raises(MessageError, match="private use") as e:
        render_template("{{ messages[0].content }}", [{"role": "user", "content": "\U000F0001"}], tokenizer=chat_tok)
    assert e.value.param == "messages[0]"
    # the sandbox holds: no attribute access to Python internals
    with pytest.raises(GlmkitError, match="SecurityError"):
        render_template("{{ messages.__class__.__mro__ }}", user, tokenizer=chat_tok)
