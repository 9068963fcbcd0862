"""kcd.optim: a recipe's SGD, fused or not, makes the same updates."""
from __future__ import annotations

import copy

import pytest
import torch

from kcd.optim import load_sgd_state, sgd
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


@pytest.mark.parametrize("saved, resumed", [(False, True), (True, False)])
def test_a_resume_keeps_its_own_fused_setting(saved, resumed):
    """fused_optimizer is a run-time field: a checkpoint written with one setting resumes
    with the run's (load_state_dict alone would restore the checkpoint's)."""
    model = torch.nn.Linear(4, 2)
    recipe = Recipe(iterations=2, batch_size=2, lr=0.1, fused_optimizer=saved)
    first = sgd(model.parameters(), recipe)
    model(torch.randn(3, 4)).sum().backward()
    first.step()
    state = first.state_dict()
    again = sgd(model.parameters(), Recipe(iterations=2, batch_size=2, lr=0.1,
                                           fused_optimizer=resumed))
    load_sgd_state(again, state, again_recipe := Recipe(iterations=2, batch_size=2, lr=0.1,
                                                         fused_optimizer=resumed))
    assert again_recipe.fused_optimizer is resumed
    assert [g["fused"] for g in again.param_groups] == [True if resumed else None]
    assert torch.equal(again.state[model.weight]["momentum_buffer"],
                       first.state[model.weight]["momentum_buffer"])
    again.step()  # and it steps
