"""`glmkit chat` end to end: converted HF GLM-4 (Glm4ForCausalLM) and GLM-4.5 (Glm4MoeForCausalLM)
folders with random tiny weights, built from transformers configs here and saved with a glmkit-trained
tokenizer (which has GLM-4.5's structural tokens), chat with tools enabled; a scripted model forces
tool calls through the command's own code (`glmkit.cli.chat.run`)."""

import builtins
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmkit.chat.agent import ScriptedModel, read_transcript
from glmkit.chat.render import chat_template
from glmkit.cli import chat as chat_cli
from glmkit.cli import main, verb_parser

ROOT = Path(__file__).resolve().parents[1]


def _sandbox_ok() -> bool:
    from glmkit.chat.sandbox import sandbox_problem
    return sandbox_problem() is None


def save_hf(folder: Path, arch: str, tok, **extra) -> Path:
    import transformers
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, pad_token_id=None, eos_token_id=None,
        bos_token_id=None, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, arch)._from_config(cfg).eval()
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def folders(chat_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_cli")
    glm4 = save_hf(root / "glm4", "Glm4ForCausalLM", chat_tok, attention_bias=True)
    (glm4 / "chat_template.jinja").write_text(chat_template("glm4"), encoding="utf-8")   # auto: the template
    moe = save_hf(root / "glm45", "Glm4MoeForCausalLM", chat_tok, n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True)
    notes = root / "notes"
    notes.mkdir()
    (notes / "weather.txt").write_text("Weather report\n\nThe weather in Beijing is sunny, 3 degrees.\n")
    (root / "my_tools.py").write_text(
        'def get_weather(city: str) -> dict:\n    """Look up the weather of a city."""\n'
        '    return {"city": city, "temp": 3}\n')
    return {"glm4": glm4, "glm45": moe, "notes": notes, "functions": root / "my_tools.py", "root": root}


def tools_args(folders, workspace: Path) -> list[str]:
    python = ["--tools", "python,browser", "--workspace", str(workspace)] if _sandbox_ok() else ["--tools", "browser"]
    return [*python, "--browse-dir", str(folders["notes"]), "--functions", str(folders["functions"])]


@pytest.mark.slow
def test_glm4_hf_chat_in_a_subprocess(folders, tmp_path):
    transcript = tmp_path / "t.jsonl"
    argv = [sys.executable, "-m", "glmkit", "chat", str(folders["glm4"]), "--prompt", "Weather in Beijing?",
            "--max-new-tokens", "6", "--max-rounds", "2", "--seed", "0", "--transcript", str(transcript),
            *tools_args(folders, tmp_path / "ws")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "format template (glm4)" in out.stderr
    events = read_transcript(transcript)
    assert events[0] == {"event": "user", "content": "Weather in Beijing?"}
    assert events[-1]["event"] == "end" and events[-1]["reason"] in ("answer", "length", "max_rounds", "max_calls")
    replies = [e for e in events if e["event"] == "assistant"]
    assert replies and all(1 <= e["tokens"] <= 6 for e in replies)
    assert out.stdout == "".join(e["message"]["content"] or "" for e in replies) + "\n"    # the replies, streamed


def test_glm45_moe_chat_prompt_on_stdin(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
    transcript = tmp_path / "t.jsonl"
    rc = main(["chat", str(folders["glm45"]), "--max-new-tokens", "5", "--max-rounds", "2", "--temperature", "0",
               "--thinking", "off", "--transcript", str(transcript), *tools_args(folders, tmp_path / "ws")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "format glm45" in err
    events = read_transcript(transcript)
    assert events[0] == {"event": "user", "content": "你好"}
    assert events[-1]["event"] == "end"
    replies = [e for e in events if e["event"] == "assistant"]
    assert replies and all(1 <= e["tokens"] <= 5 for e in replies)
    assert out == "".join(e["message"]["content"] or "" for e in replies) + "\n"


def parsed(folder, *extra):
    return verb_parser("chat").parse_args([str(folder), "--temperature", "0", "--max-new-tokens", "64", *extra])


def test_scripted_tool_calls_through_the_command(folders, chat_tok, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                  # the browser's index cache goes to ./data/browser
    call = "<tool_call>{}\n<arg_key>{}</arg_key>\n<arg_value>{}</arg_value>\n</tool_call><|observation|>"
    python = _sandbox_ok()
    texts = ([call.format("python", "code", "print(6 * 7)")] if python else []) + [
        call.format("browser_search", "query", "weather Beijing"),
        call.format("get_weather", "city", "北京"),
        "<think>all known</think>\nSunny, 3 degrees 【0†Weather report】.<|user|>"]
    transcript = tmp_path / "t.jsonl"
    args = parsed(folders["glm45"], "--prompt", "Weather?", "--transcript", str(transcript), *tools_args(folders, tmp_path / "ws"))
    assert chat_cli.run(args, logits_processor=ScriptedModel.from_texts(chat_tok, texts)) == 0
    out, err = capsys.readouterr()
    assert out == "Sunny, 3 degrees 【0†Weather report】.\n"
    assert ("[python] print(6 * 7)\n  => 42\n" in err) == python
    assert "[browser_search] weather Beijing\n  =>  # 【0†Weather report†weather.txt】" in err
    assert '[get_weather] 北京\n  => {"city": "北京", "temp": 3}\n' in err
    assert "[thinking] all known" in err
    assert f"format glm45, tools: {'python, ' if python else ''}browser_search, browser_open, browser_find, get_weather]" in err
    tools = [e for e in read_transcript(transcript) if e["event"] == "tool"]
    assert [t["name"] for t in tools] == (["python"] if python else []) + ["browser_search", "get_weather"]
    assert all(t["error"] is None for t in tools)


class Interrupting(ScriptedModel):
    """Scripted replies, but Ctrl-C arrives while the turn numbered `at` is generated."""

    def __init__(self, tok, texts, at: int):
        other = ScriptedModel.from_texts(tok, texts)
        super().__init__(other.turns, other.end_id)
        self.at = at

    def __call__(self, produced, logits):
        out = super().__call__(produced, logits)
        if self.turn == self.at and len(produced) == 1:
            raise KeyboardInterrupt
        return out


def test_interactive_reset_save_interrupt_exit(folders, chat_tok, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save = tmp_path / "conv.json"
    lines = iter(["hello", f"/save {save}", "/reset", "stop this", "again", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    args = parsed(folders["glm4"], "--format", "glm4", "--system", "Be brief.")
    toolbox = chat_cli.build_toolbox(args, chat_cli.check(args))
    script = Interrupting(chat_tok, ["\nhi<|user|>", "\nnever shown<|user|>", "\nbye<|user|>"], at=1)
    agent = chat_cli.make_agent(args, toolbox, script)
    assert chat_cli.interactive(agent) == 0
    out, err = capsys.readouterr()
    assert out.count("glm> ") == 3 and "hi\n" in out and "bye\n" in out
    assert json.loads(save.read_text()) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "hello"},
                                            {"role": "assistant", "content": "hi"}]
    assert "[conversation reset]" in err and "[interrupted]" in err
    assert not agent.engine.has_work()                    # the interrupted request was cancelled and its row freed
    assert [m.to_dict() for m in agent.messages] == [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "stop this"},
                                                     {"role": "user", "content": "again"},
                                                     {"role": "assistant", "content": "bye"}]


def test_python_without_a_sandbox_needs_unsafe_python(folders, chat_tok, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ipykernel")
    import glmkit.chat.sandbox as sandbox
    monkeypatch.setattr(sandbox, "sandbox_problem", lambda python=None: "bubblewrap is not installed")
    argv = ["chat", str(folders["glm4"]), "--tools", "python", "--workspace", str(tmp_path / "ws"), "--prompt", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("glmkit chat: error: --tools python: cannot sandbox the interpreter: bubblewrap is "
                                "not installed. Fix that, or pass --unsafe-python to run the model's code without "
                                "isolation")
    texts = ["python\nimport os\nprint(os.getpid() > 0)<|observation|>", "\nyes<|user|>"]
    args = parsed(folders["glm4"], "--format", "glm4", *argv[2:], "--unsafe-python")
    assert chat_cli.run(args, logits_processor=ScriptedModel.from_texts(chat_tok, texts)) == 0
    out, err = capsys.readouterr()
    assert out == "yes\n"
    assert "NOT sandboxed" in err and "[python] import os\n    print(os.getpid() > 0)\n  => True\n" in err


def test_quantized_weights_and_fp8_cache_through_the_command(folders, chat_tok, tmp_path, monkeypatch, capsys):
    """`--quantize int8 --kv-dtype fp8` on the MoE model: the command's engine holds int8 blocks (routed
    experts included) and an fp8 KV pool, and a scripted tool call and answer go through it."""
    from glmkit.model.quantize import QuantizedLinear, QuantizedWeight
    monkeypatch.chdir(tmp_path)
    args = parsed(folders["glm45"], "--quantize", "int8", "--kv-dtype", "fp8", "--prompt", "Weather?",
                  "--functions", str(folders["functions"]))
    toolbox = chat_cli.build_toolbox(args, chat_cli.check(args))
    agent = chat_cli.make_agent(args, toolbox)
    engine = agent.engine
    assert engine.pool.dtype == torch.float8_e4m3fn
    assert not any(isinstance(m, torch.nn.Linear) for m in engine.model.layers.modules())
    assert all(isinstance(b.self_attn.qkv_proj, QuantizedLinear) for b in engine.model.layers)
    assert isinstance(engine.model.layers[1].mlp.experts.gate_up_proj, QuantizedWeight)     # layer 0 is dense
    agent.close()
    toolbox.close()
    call = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call><|observation|>"
    texts = [call, "<think>known</think>\nSunny.<|user|>"]
    assert chat_cli.run(args, logits_processor=ScriptedModel.from_texts(chat_tok, texts)) == 0
    out, err = capsys.readouterr()
    assert out == "Sunny.\n"
    assert '[get_weather] 北京\n  => {"city": "北京", "temp": 3}\n' in err
