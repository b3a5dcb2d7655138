"""The EMA convention: EDM's half-life in images with its ramp-up, and the in-place weight swap."""

from __future__ import annotations

import pytest
import torch

from cxr_diffusion.diffusion.ema import EMA, EMA_RAMPUP_RATIO, ema_beta, swap_weights


def test_the_first_step_copies_the_weights():
    assert ema_beta(5000, images_seen=0, images_per_step=256) == 0.0


def test_the_configured_half_life_holds_once_the_ramp_up_is_over():
    images_per_step, half_life = 256, 5000
    after_ramp_up = int(half_life / EMA_RAMPUP_RATIO)
    beta = ema_beta(half_life, after_ramp_up, images_per_step)
    # `half_life` images later, the weight of what the average held is halved
    assert beta ** (half_life / images_per_step) == pytest.approx(0.5)
    assert ema_beta(half_life, 10 * after_ramp_up, images_per_step) == beta


def test_early_in_a_run_the_half_life_is_capped_by_the_images_seen():
    images_per_step = 64
    early = ema_beta(5000, images_seen=1000, images_per_step=images_per_step)
    assert early == pytest.approx(0.5 ** (images_per_step / (EMA_RAMPUP_RATIO * 1000)))
    assert early < ema_beta(5000, images_seen=50_000, images_per_step=images_per_step)


def test_half_life_in_images_does_not_depend_on_how_the_images_are_batched():
    """Two steps of 128 images move the average as far as one step of 256."""
    images_seen = 1_000_000
    assert ema_beta(5000, images_seen, 128) ** 2 == pytest.approx(ema_beta(5000, images_seen, 256))


def test_update_moves_the_average_towards_the_weights():
    weights = [torch.nn.Parameter(torch.zeros(3))]
    ema = EMA(weights)
    with torch.no_grad():
        weights[0].fill_(1.0)
    ema.update(weights, beta=0.75)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.25))
    ema.update(weights, beta=0.0)
    assert torch.equal(ema.shadow[0], weights[0].detach())


def test_swapped_into_holds_the_average_inside_the_block_only():
    weights = [torch.nn.Parameter(torch.zeros(2))]
    ema = EMA(weights)
    with torch.no_grad():
        weights[0].fill_(4.0)
    ema.update(weights, beta=0.5)
    with ema.swapped_into(weights):
        assert torch.equal(weights[0].data, torch.full((2,), 2.0))
    assert torch.equal(weights[0].data, torch.full((2,), 4.0))
    ema.move_into(weights)
    assert torch.equal(weights[0].data, torch.full((2,), 2.0)) and ema.shadow == []


def test_swap_weights_exchanges_values_without_copying():
    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    others = [torch.ones(3), torch.full((2, 2), 2.0)]
    pointers = [p.data_ptr() for p in parameters], [o.data_ptr() for o in others]

    swap_weights(parameters, others)
    assert [p.data_ptr() for p in parameters] == pointers[1] and [o.data_ptr() for o in others] == pointers[0]
    assert torch.equal(parameters[0].data, torch.ones(3)) and torch.equal(others[1], torch.zeros(2, 2))
    swap_weights(parameters, others)
    assert [p.data_ptr() for p in parameters] == pointers[0] and torch.equal(parameters[1].data, torch.zeros(2, 2))
