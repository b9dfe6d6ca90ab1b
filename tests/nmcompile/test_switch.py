"""PrecisionSwitch: fires when the compression noise dominates the gradient, not otherwise, and the training
state goes on bit for bit under the next recipe."""
import copy

import pytest
import torch
import torch.nn as nn

from nmcompile.switch import PrecisionSwitch

HEAVY = {"quant": "luq", "bits": 2, "inner": "aot_eager"}  # 2-bit LUQ: large noise
LIGHT = {"quant": "luq", "bits": 8, "inner": "aot_eager"}
DENSE = {"inner": "aot_eager"}


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x, y):
        return (self.fc(x) - y).pow(2).mean()


def _batches(targets, n=8, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=g) * 3
    for _ in range(n):
        x = torch.randn(batch, 16, generator=g)
        y = x @ a.T if targets == "signal" else torch.randn(batch, 16, generator=g)  # noise: no gradient to find
        yield x, y


def _train(switch, batches, lr=0.0):
    opt = torch.optim.SGD(switch.raw.parameters(), lr=lr)
    for step, (x, y) in enumerate(batches):
        switch.on_step(step, x, y)
        switch(x, y).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_it_switches_when_the_true_gradient_is_below_the_noise():
    """W = 0 and targets independent of x: ‖∇L‖² = 0, so the running ratio is near 0, below 1: it must fire."""
    messages = []
    switch = PrecisionSwitch(Regression(), HEAVY, then=DENSE, every=1, patience=2, log=messages.append)
    _train(switch, _batches("noise"))
    assert len(switch.events) == 1 and switch.options == DENSE
    event = switch.events[0]
    assert event.step == 1 and event.ratio < 1 and event.to_options == DENSE  # after 2 measurements below 1
    assert "step 1" in messages[0] and "switching from" in messages[0] and "compiling once more" in messages[0]
    assert len(switch.measurements) == 2  # nothing left to switch to: no more measurements


def test_it_stays_when_the_gradient_dominates():
    """Targets = A·x with a large A: ‖∇L‖² is far above 3·E‖Ĝ−G‖² of 8-bit LUQ on a 256-sample batch."""
    switch = PrecisionSwitch(Regression(), LIGHT, then=DENSE, every=1, log=lambda m: None)
    _train(switch, _batches("signal"))
    assert switch.events == [] and switch.options == LIGHT
    assert len(switch.measurements) == 8 and min(m.ratio for m in switch.measurements) > 10


def test_the_state_carries_over_bit_for_bit():
    """Parameters and optimizer state go on as they were: the steps after the switch equal those of a fresh
    model compiled under the next recipe from a copy of the state at the switch."""
    torch.manual_seed(0)
    model = Regression()
    nn.init.normal_(model.fc.weight, std=0.01)
    batches = list(_batches("noise", n=6))
    switch = PrecisionSwitch(model, HEAVY, then=DENSE, every=1, patience=2, log=lambda m: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    copies = None
    for step, (x, y) in enumerate(batches):
        switch.on_step(step, x, y)
        if switch.events and copies is None:  # the switch happened before this step: the state it carries
            params = copy.deepcopy(model.state_dict())
            state = copy.deepcopy(opt.state_dict())
            copies, start = (params, state), step
        switch(x, y).backward()
        opt.step()
        opt.zero_grad()
    assert copies is not None and start == 1
    fresh = Regression()
    fresh.load_state_dict(copies[0])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(copies[1])
    compiled = torch.compile(fresh, backend="nm", options=DENSE)
    for x, y in batches[start:]:
        compiled(x, y).backward()
        fresh_opt.step()
        fresh_opt.zero_grad()
    assert torch.equal(fresh.fc.weight, model.fc.weight)
    assert all(torch.equal(a, b) for a, b in zip(fresh_opt.state_dict()["state"][0].values(),
                                                 opt.state_dict()["state"][0].values()))


def test_a_list_of_recipes_is_walked_in_order():
    switch = PrecisionSwitch(Regression(), HEAVY, then=[{**HEAVY, "bits": 3}, DENSE], every=1, patience=1,
                             log=lambda m: None)
    _train(switch, _batches("noise", n=4))
    assert [e.to_options for e in switch.events] == [{**HEAVY, "bits": 3}, DENSE]


@pytest.mark.parametrize("kwargs,word", [({"then": []}, "then="), ({"window": 0}, "window="),
                                         ({"threshold": 0}, "threshold="), ({"patience": 0}, "patience=")])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PrecisionSwitch(Regression(), HEAVY, **kwargs)
