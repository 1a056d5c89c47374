"""Chat fine-tuning: the loss mask of rendered conversations at exact tokens (both formats), packing that never
lets one conversation see another (mask and logits), and a tiny SFT run through the trainer that lowers the loss
and resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import dense_forward, tiny_model, train_losses

from glmkit.batch import dense_mask
from glmkit.checkpoint import store as ckpt_io
from glmkit.errors import GlmkitError
from glmkit.train.chat_data import ChatBatchIterator, pack_rows, render_conversation
from glmkit.train.loop import train
from glmkit.train.setup import TrainConfig

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALLING = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
    {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."}], "tools": [WEATHER]}


def learned_runs(tok, ids, loss) -> list[str]:
    """The text of each run of consecutive loss positions' targets (token i predicts i + 1)."""
    runs, cur = [], []
    for i in range(len(ids) - 1):
        if loss[i]:
            cur.append(int(ids[i + 1]))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("fmt, expected", [
    ("glm4", ['get_weather\n{"city": "北京"}<|observation|>', "\nIt is sunny.<|user|>"]),
    ("glm45", ["\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
               "</tool_call><|observation|>", "\n<think></think>\nIt is sunny.<|user|>"]),
])
def test_the_loss_covers_exactly_what_the_assistant_writes(fmt, expected, chat_tok):
    ids, loss = render_conversation(CALLING, fmt, chat_tok)
    assert learned_runs(chat_tok, ids, loss) == expected
    assert not loss[-1]  # the last token predicts nothing
    # the first learned target follows the assistant's role token; the token ending each turn is learned
    first = int(np.flatnonzero(loss)[0])
    assert ids[first] == chat_tok.special_id("<|assistant|>")


def test_bad_conversations_name_the_problem(chat_tok):
    with pytest.raises(GlmkitError, match="no assistant message"):
        render_conversation({"messages": [{"role": "user", "content": "hi"}]}, "glm4", chat_tok)
    with pytest.raises(GlmkitError, match=r"line7: messages\[0\]"):
        render_conversation({"messages": [{"role": "robot", "content": "hi"}]}, "glm4", chat_tok, "line7")


def _examples(tok, n=3):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "Answer " + "yes " * i}]} for i in range(n)]
    return [render_conversation(r, "glm4", tok) for r in rows]


@pytest.mark.parametrize("layout", ["chat", "causal"])
def test_packing_never_lets_one_conversation_see_another(layout, chat_tok):
    examples = _examples(chat_tok, 3)
    lengths = [len(ids) for ids, _ in examples]
    T = lengths[0] + lengths[1] + 2
    batch, placed = pack_rows(examples, 2, T, layout, chat_tok.pad_id)
    assert placed == 3
    mask = dense_mask(batch)
    seg = torch.as_tensor(batch.segment_ids)
    for r in range(2):
        for q in range(T):
            if seg[r, q] < 0:
                continue
            same = (seg[r] == seg[r, q]).nonzero().squeeze(-1)
            start = int(same[0])
            expect = torch.zeros(T, dtype=torch.bool)
            expect[start:q + 1] = True                     # causal within its own conversation only
            assert torch.equal(mask[r, q], expect), (r, q)
    # positions as the engine's Request.chat / Request.causal lay a prompt out
    n0 = lengths[0]
    if layout == "chat":
        assert batch.sep[0, 0] == 1 and batch.sep[0, n0] == n0 + 1
        assert batch.position_ids[0, :n0].tolist() == [0] * n0 and batch.block_position_ids[0, :n0].tolist() == \
            list(range(n0))
    else:
        assert batch.sep[0, n0] == n0 and batch.position_ids[0, n0:n0 + lengths[1]].tolist() == \
            list(range(lengths[1]))
    # numerically: a packed conversation's logits are those it has alone in a row
    model = tiny_model(vocab_size=chat_tok.vocab_size)
    alone, _ = pack_rows(examples[1:2], 1, T, layout, chat_tok.pad_id)
    packed = dense_forward(model, batch)[0, n0:n0 + lengths[1]]
    torch.testing.assert_close(packed, dense_forward(model, alone)[0, :lengths[1]], atol=1e-5, rtol=1e-5)


def test_the_iterator_resumes_bit_for_bit(chat_tok):
    examples = _examples(chat_tok, 7)
    a = ChatBatchIterator(examples, 2, 64, "chat", chat_tok.pad_id, seed=5)
    for _ in range(3):
        next(a)
    b = ChatBatchIterator(examples, 2, 64, "chat", chat_tok.pad_id, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(5):  # across the epoch boundary
        x, y = next(a), next(b)
        assert all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("input_ids", "loss_mask", "sep"))
    with pytest.raises(GlmkitError, match="same chat data"):
        ChatBatchIterator(examples[:6], 2, 64, "chat", chat_tok.pad_id, seed=5).load_state_dict(a.state_dict())


def _init_checkpoint(tok, path, max_positions=256):
    """A tiny GLM-objective model saved as a glmkit checkpoint with the chat tokenizer."""
    model = tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=max_positions)
    return ckpt_io.save_checkpoint(
        path, 0, model_state=model.state_dict(), save_config=model.config.save,
        save_tokenizer=lambda p: tok.save(p.parent), train_state={"step": 0},
        fingerprint={"objective": {"kind": "glm"}, "tokenizer": tok.hash}, keep=1)


def _sft_config(init, data, out, **kw):
    base = dict(out_dir=str(out), init=str(init), chat_data=str(data), chat_format="glm4", seq_len=96,
                batch_size=2, max_steps=8, lr=3e-3, warmup_steps=1, eval_every=0, save_every=4, keep=3,
                progress=False, tensorboard=False, prefetch=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_a_tiny_sft_run_lowers_the_loss_and_resumes_exactly(chat_tok, tmp_path):
    init = _init_checkpoint(chat_tok, tmp_path / "init")
    rows = [{"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": "It is sunny."}]} for _ in range(6)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train(_sft_config(init, data, tmp_path / "full", max_steps=16, save_every=8))
    losses = train_losses(tmp_path / "full")
    assert sorted(losses) == list(range(1, 17)) and res["step"] == 16
    assert losses[16] < 0.5 * losses[1]
    # resume from step 8 of a copy: the same losses, bit for bit
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-000016")
    (part / "checkpoints" / "latest").write_text("step-000008\n")
    train(_sft_config(init, data, part, max_steps=16, save_every=8, resume=True))
    assert train_losses(part) == losses
    # the fine-tuned checkpoint loads as a GLM-objective chat model
    from glmkit.checkpoint.loader import load
    assert load(tmp_path / "full").objective == "glm"


def test_chat_options_are_checked_up_front(chat_tok, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("")
    with pytest.raises(GlmkitError, match="--chat-data and --init go together"):
        TrainConfig(chat_data=str(data)).validate()
    with pytest.raises(GlmkitError, match="--chat-format"):
        TrainConfig(chat_data=str(data), init=str(tmp_path), chat_format="chatml").validate()
    with pytest.raises(GlmkitError, match="--init"):
        TrainConfig(chat_data=str(data), init=str(tmp_path / "nope")).validate()
    with pytest.raises(GlmkitError, match="--corpus"):
        TrainConfig(chat_data=str(data), init=str(tmp_path), corpus=str(tmp_path)).validate()


def test_glmkit_sft_trains_on_the_task_suites_conversations(chat_tok, tmp_path, capsys):
    from glmkit.cli import main
    from glmkit.eval.toolsft import conversations, write_jsonl
    from glmkit.eval.tooltasks import ToolSuite

    suite = ToolSuite(seed=0, per_split={"train": 3, "heldout": 0}, families=("functions",), langs=("en",))
    data = write_jsonl(conversations(suite.tasks("train"), "glm45"), tmp_path / "train.jsonl")
    init = _init_checkpoint(chat_tok, tmp_path / "init", max_positions=2048)
    argv = ["sft", "--init", str(init), "--chat-data", str(data), "--chat-format", "glm45", "--out-dir",
            str(tmp_path / "run"), "--seq-len", "2048", "--batch-size", "1", "--max-steps", "2", "--save-every", "2",
            "--eval-every", "0", "--no-progress", "--no-tensorboard", "--device", "cpu"]
    assert main(argv) == 0
    assert "step 2: loss" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert record["fingerprint"]["objective"]["chat"] == "glm45" and record["fingerprint"]["objective"]["layout"] == "chat"


@pytest.mark.parametrize("layout", ["chat", "causal"])
def test_training_and_the_engine_agree_on_a_packed_conversation(layout, chat_tok):
    """The log-probabilities training assigns to a conversation packed second in a row are the engine's
    prompt log-probabilities for the same ids as `Request.chat` (GLM) / `Request.causal` (CLM, HF)."""
    from glmkit.infer.engine import Engine, Request

    examples = [render_conversation(CALLING, "glm4", chat_tok), _examples(chat_tok, 2)[1]]
    first, (ids, _) = len(examples[1][0]), examples[0]
    batch, placed = pack_rows([examples[1], examples[0]], 1, first + len(ids) + 3, layout, chat_tok.pad_id)
    assert placed == 2
    model = tiny_model(vocab_size=chat_tok.vocab_size, max_position_embeddings=1024)
    logp = torch.log_softmax(dense_forward(model, batch)[0].float(), -1)
    trained = logp[first:first + len(ids) - 1].gather(1, torch.as_tensor(ids[1:])[:, None]).squeeze(1)
    req = (Request.chat if layout == "chat" else Request.causal)(ids.tolist(), max_new_tokens=1, prompt_logprobs=True)
    served = torch.tensor(Engine(model, chat_tok, max_batch=1).generate([req])[0].prompt_logprobs)
    start = 1 if layout == "chat" else 0          # the engine scores tokens after Part A's first
    assert len(served) == len(ids) - 1 - start
    torch.testing.assert_close(trained[start:], served, atol=1e-4, rtol=1e-4)


def test_lora_merged_weights_give_the_adapter_models_outputs(chat_tok):
    from glmkit.model.glm import GLM
    from glmkit.train.lora import add_lora, merged_state_dict, parameter_counts

    examples = _examples(chat_tok, 2)
    batch, _ = pack_rows(examples, 1, 64, "chat", chat_tok.pad_id)
    for name in ("tiny", "tiny-glm", "tiny-moe"):
        model = tiny_model(name, vocab_size=chat_tok.vocab_size)
        base = dense_forward(model, batch)
        add_lora(model, rank=4, alpha=8, init_lora_weights=False)   # B random too: the adapter changes outputs
        trainable, total = parameter_counts(model)
        assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) and trainable < total
        adapted = dense_forward(model, batch)
        assert not torch.allclose(adapted, base, atol=1e-3)
        plain = GLM(model.config).eval()
        plain.load_state_dict(merged_state_dict(model.state_dict(), scaling=2.0))
        torch.testing.assert_close(dense_forward(plain, batch), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(GlmkitError, match="--lora-targets"):
        add_lora(tiny_model(vocab_size=chat_tok.vocab_size), rank=2, targets=("q_proj",))


def test_a_lora_sft_run_trains_only_the_adapter_saves_merged_weights_and_resumes(chat_tok, tmp_path):
    from glmkit.checkpoint.loader import load

    init = _init_checkpoint(chat_tok, tmp_path / "init")
    rows = [{"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": "It is sunny."}]} for _ in range(6)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(max_steps=8, save_every=4, lora_rank=4, lr=1e-2)
    res = train(_sft_config(init, data, tmp_path / "full", **cfg))
    losses = train_losses(tmp_path / "full")
    assert losses[8] < losses[1] and res["trainable_params"] < res["num_params"] and res["peak_memory_bytes"] > 0
    before, after = load(init).model.state_dict(), load(tmp_path / "full").model.state_dict()
    assert set(before) == set(after)       # plain keys: the merged model loads like any checkpoint
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)   # only adapted weights moved
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-000008")
    (part / "checkpoints" / "latest").write_text("step-000004\n")
    train(_sft_config(init, data, part, resume=True, **cfg))
    assert train_losses(part) == losses
    assert all(torch.equal(v, load(part).model.state_dict()[k]) for k, v in after.items())


def test_a_lora_run_resumes_only_on_its_own_base(chat_tok, tmp_path):
    init = _init_checkpoint(chat_tok, tmp_path / "init")
    other = _init_checkpoint(chat_tok, tmp_path / "other")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    train(_sft_config(init, data, tmp_path / "run", max_steps=2, save_every=2, lora_rank=2))
    with pytest.raises(GlmkitError, match="objective.lora"):
        train(_sft_config(other, data, tmp_path / "run", max_steps=4, save_every=2, lora_rank=2, resume=True))
