"""SharedEngine (glmkit/infer/shared.py): threads that each drive one engine through their own view get
exactly their own requests' outputs, the same tokens as the engine gives them alone, decoded together."""

import threading

import pytest
import torch

from glmkit.infer.engine import Engine, Request
from glmkit.infer.sampling import SamplingConfig
from glmkit.infer.shared import SharedEngine
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name("tiny", vocab_size=300)).eval()


class _Ids:      # the special ids an id-only engine needs
    sop_id, eop_id, eot_id, gmask_id = 1, 2, 3, 4


PROMPTS = [[10 + i, 20 + i, 30 + i, 40 + 2 * i] for i in range(6)]


def _drive(view, prompts, n_new):
    """What `Agent` does: add a request, step until it is finished, keep only its tokens; one at a time."""
    got = []
    for p in prompts:
        rid = view.add(Request.causal(p, SamplingConfig(max_new_tokens=n_new), ignore_stop=True))
        tokens, finished = [], None
        while finished is None and view.has_work():
            for out in view.step():
                assert out.request == rid          # a view never sees another's outputs
                if out.token is not None:
                    tokens.append(out.token)
                finished = out.finished or finished
        got.append(tokens)
    return got


def test_threads_get_their_own_tokens(model):
    alone = [r.tokens[0] for r in Engine(model, _Ids(), max_batch=1, max_len=64).generate(
        [Request.causal(p, SamplingConfig(max_new_tokens=7), ignore_stop=True) for p in PROMPTS])]
    shared = SharedEngine(Engine(model, _Ids(), max_batch=3, max_len=64))
    results = [None] * 3

    def worker(k):
        results[k] = _drive(shared.view(), PROMPTS[k::3], 7)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[k % 3][k // 3] for k in range(6)] == alone


def test_one_engine_step_serves_every_view(model):
    engine = Engine(model, _Ids(), max_batch=2, max_len=64)
    steps = []
    step = engine.step
    engine.step = lambda: steps.append(1) or step()
    shared = SharedEngine(engine)
    a, b = shared.view(), shared.view()
    ra = a.add(Request.causal(PROMPTS[0], SamplingConfig(max_new_tokens=3), ignore_stop=True))
    rb = b.add(Request.causal(PROMPTS[1], SamplingConfig(max_new_tokens=3), ignore_stop=True))
    first = a.step()                                   # one engine step: both prompts fed, both sampled
    assert len(steps) == 1 and [o.request for o in first] == [ra]
    assert [o.request for o in b.step()] == [rb] and len(steps) == 1     # b's output was kept for b
    while a.has_work() or b.has_work():
        a.step()
        b.step()
    assert len(steps) == 3                             # 3 tokens each, decoded together


def test_a_cancelled_request_ends_and_frees_its_view(model):
    shared = SharedEngine(Engine(model, _Ids(), max_batch=2, max_len=64))
    view = shared.view()
    rid = view.add(Request.causal(PROMPTS[0], SamplingConfig(max_new_tokens=50), ignore_stop=True))
    view.step()
    view.cancel(rid)
    outs = []
    while view.has_work():
        outs += view.step()
    assert outs[-1].finished == "cancelled" and not view.has_work()
    assert _drive(shared.view(), PROMPTS[1:2], 3)[0] == _drive(view, PROMPTS[1:2], 3)[0]
