"""AdamW, global-norm clipping and the schedules (pipeline/training/optimizer.py) against torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_ and a LambdaLR with the same warm-up and decay."""
import math

import numpy as np
import pytest

from pipeline.training.optimizer import AdamW, AdamWSettings, clip_grad_norm, lr_factor

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_steps_match_torch_adamw_with_clipping_and_schedule(schedule):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((4, 6)).astype(np.float32), "b": rng.standard_normal((6, 4)).astype(np.float32)}
    theirs = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    settings = AdamWSettings(lr=1e-2, weight_decay=0.1)
    ours = AdamW(params, settings)
    total, warmup = 6, 2
    torch_opt = torch.optim.AdamW(list(theirs.values()), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda k: lr_factor(k, total, warmup, schedule))
    for step in range(total):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) * (3 if step % 2 else 0.01)
                 for k, v in params.items()}
        for k, p in theirs.items():
            p.grad = torch.from_numpy(grads[k].copy())
        torch_norm = torch.nn.utils.clip_grad_norm_(list(theirs.values()), max_norm=1.0)
        torch_opt.step()
        scheduler.step()
        norm = clip_grad_norm(grads, 1.0)
        ours.update(grads, settings.lr * lr_factor(step, total, warmup, schedule))
        assert abs(norm - torch_norm.item()) < 1e-5 * norm
        for k in params:
            assert np.allclose(params[k], theirs[k].detach().numpy(), rtol=1e-6, atol=1e-7), (step, k)


def test_schedule_shape():
    assert [lr_factor(k, 10, 4, "linear") for k in (0, 2, 4, 7, 10)] == [0, 0.5, 1, 0.5, 0]
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_state_round_trip():
    params = {"a": np.ones((2, 3), dtype=np.float32)}
    first = AdamW(params, AdamWSettings())
    first.update({"a": np.full((2, 3), 0.5, dtype=np.float32)}, 1e-3)
    second = AdamW({"a": params["a"].copy()}, AdamWSettings())
    second.load_state(first.state())
    assert second.step == 1 and np.array_equal(second.m["a"], first.m["a"]) and np.array_equal(second.v["a"], first.v["a"])
