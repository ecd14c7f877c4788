"""Signum moves every weight by exactly lr along the sign of its gradient average, and trains an SAE."""

import pytest
import torch

from fitting import fit, sparse_data
from midisc.sae import TopKSAE
from midisc.training.module import SAEModule
from midisc.training.signum import Signum


def test_each_weight_moves_by_lr_along_the_sign_of_the_averaged_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = Signum([w], lr=0.1, momentum=0.5)
    w.grad = torch.tensor([4.0, -0.001, 0.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.9, 2.1, 3.0]))  # the size of a gradient does not matter
    w.grad = torch.tensor([-1.0, 0.003, 0.0])  # averages: 0.5 * 2 - 0.5 = 1.5 > 0, -0.00025 + 0.0015 > 0
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.8, 2.0, 3.0]))


def test_refuses_a_bad_setting_in_one_line():
    with pytest.raises(ValueError, match=r"^lr must be"):
        Signum([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    with pytest.raises(ValueError, match=r"^momentum must be"):
        Signum([torch.nn.Parameter(torch.zeros(1))], momentum=1.5)


def test_trains_an_sae():
    data = sparse_data()
    module = SAEModule(TopKSAE(16, expansion=4, k=4, seed=0), lambda p: Signum(p, lr=3e-3), b_dec_init="mean")
    first = module.sae(data[0]).mse.item()
    fit(module, data, epochs=3)
    assert module.sae(data[0]).mse.item() < 0.3 * first
