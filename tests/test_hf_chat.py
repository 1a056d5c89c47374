"""`glmkit convert --to-hf` of a glmkit-trained model writes what transformers needs to chat with it:
the chat template (rendering exactly what glmkit's renderer renders), the special tokens, and the
stop ids in generation_config.json."""

import json
import shutil

import pytest
from helpers import CONVERSATIONS, openai_with_parsed_arguments

from glmkit.chat import render_text, stop_ids
from glmkit.checkpoint.loader import locate
from glmkit.cli import main
from glmkit.data.tokenizer import GLMTokenizer


@pytest.mark.parametrize("fmt", ["glm4", "glm45"])
def test_exported_model_chats_in_transformers_as_glmkit_renders(tiny_run, tmp_path, capsys, fmt):
    from transformers import AutoTokenizer, GenerationConfig
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", str(tiny_run.directory), "--out", str(out), "--chat-format", fmt]) == 0
    assert f"the {fmt} chat template" in capsys.readouterr().out
    tok = GLMTokenizer.load(out / "tokenizer.json")
    hf = AutoTokenizer.from_pretrained(out)
    for name, (messages, tools, fmts) in CONVERSATIONS.items():
        if fmt not in fmts:
            continue
        want = render_text(messages, tools, fmt)
        got = hf.apply_chat_template(openai_with_parsed_arguments(messages), tools=tools, tokenize=False,
                                     add_generation_prompt=True)
        assert got == want, name
    assert GenerationConfig.from_pretrained(out).eos_token_id == stop_ids(fmt, tok)
    assert hf.eos_token == "<|endoftext|>"
    assert {"<|user|>", "<|assistant|>", "[gMASK]", "<|endoftext|>"} <= set(hf.all_special_tokens)


def test_a_models_own_tokenizer_config_is_kept(tiny_run, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_run.directory, src)
    ckpt, _ = locate(src)                            # the run's latest checkpoint, which is converted
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": "mine"}))
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", str(src), "--out", str(out)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"chat_template": "mine"}
    assert not (out / "generation_config.json").exists()
