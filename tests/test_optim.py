"""kcd.optim: a recipe's SGD, fused or not, makes the same updates."""
from __future__ import annotations

import copy

import pytest
import torch

from kcd.optim import sgd
from kcd.specs import Recipe


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_and_looped_sgd_make_the_same_updates(nesterov):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    runs = {}
    for fused in (True, False):
        recipe = Recipe(iterations=5, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4,
                        nesterov=nesterov, fused_optimizer=fused)
        net = copy.deepcopy(model)
        optimizer = sgd(net.parameters(), recipe)
        assert optimizer.defaults["fused"] is (True if fused else None)
        assert optimizer.defaults["nesterov"] is nesterov
        torch.manual_seed(1)
        for _ in range(5):
            optimizer.zero_grad()
            net(torch.randn(8, 16)).square().mean().backward()
            optimizer.step()
        runs[fused] = net
    assert not torch.equal(runs[True][0].weight, model[0].weight)  # it trained
    for a, b in zip(runs[True].parameters(), runs[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
