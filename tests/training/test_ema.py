"""EMA of the weights: decay warm-up (1 + n) / (10 + n) capped at the decay, and it follows the model."""

from __future__ import annotations

import pytest
import torch

from lsdm_aug.training.common import EMA


def test_decay_warms_up_and_is_capped():
    ema = EMA(torch.nn.Linear(2, 1), decay=0.9)
    decays = []
    for _ in range(200):
        decays.append(ema.current_decay())
        ema.update(torch.nn.Linear(2, 1))
    for n in range(5):
        assert decays[n] == pytest.approx((1 + n) / (10 + n))
    assert decays == sorted(decays)
    assert decays[-1] == 0.9 and max(decays) == 0.9
    assert ema.updates == 200


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1])
def test_invalid_decay_is_named(decay):
    with pytest.raises(ValueError, match=f"got {decay}"):
        EMA(torch.nn.Linear(2, 1), decay=decay)


def test_ema_moves_towards_the_model_by_one_minus_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.999)
    start = [p.clone() for p in ema.model.parameters()]
    assert all(not p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        model[1].running_mean.fill_(0.5)
    decay = ema.current_decay()  # 0.1 at the first update
    ema.update(model)
    for before, after, target in zip(start, ema.model.parameters(), model.parameters()):
        assert torch.allclose(after, before + (1 - decay) * (target - before))
        assert (target - after).abs().max() < (target - before).abs().max()
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)  # buffers are copied
    distance = [(a - b).abs().sum() for a, b in zip(ema.model.parameters(), model.parameters())]
    for _ in range(20):
        ema.update(model)
    assert all((a - b).abs().sum() < d for a, b, d in zip(ema.model.parameters(), model.parameters(), distance))


def test_ema_is_a_copy_and_unwraps_ddp_like_modules():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = torch.nn.Linear(2, 2)
    ema = EMA(Wrapper(inner), decay=0.5)
    assert isinstance(ema.model, torch.nn.Linear) and ema.model is not inner
    with torch.no_grad():
        inner.weight.zero_()
    assert ema.model.weight.abs().sum() > 0
    ema.update(Wrapper(inner))
    assert ema.model.weight.abs().sum() > 0
