"""Hostile probes of pass 29's fixes (most_sampling_steps, the random split's train clamp)."""

import warnings

import pandas as pd
import pytest
import torch


def _dpm_linspace(timesteps):
    from diffusers import DDPMScheduler

    from cxr_diffusion.diffusion.noise import sampling_scheduler

    train = DDPMScheduler(num_train_timesteps=timesteps, timestep_spacing="linspace", clip_sample=False)
    return sampling_scheduler(train, "dpm++")


def test_most_sampling_steps_dpm_linspace_bound_gives_distinct_finite_steps():
    """DPM-Solver++ over "linspace" spacing (a saved model may carry it) at the bound repeats a timestep and gives NaN."""
    from cxr_diffusion.config import most_sampling_steps

    warnings.simplefilter("ignore")
    timesteps = 10
    scheduler = _dpm_linspace(timesteps)
    steps = most_sampling_steps(timesteps, "linspace", "dpm++")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 2, 2, generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * torch.randn(x.shape, generator=generator), t, x).prev_sample
    assert len(set(scheduler.timesteps.tolist())) == len(scheduler.timesteps), scheduler.timesteps.tolist()
    assert torch.isfinite(x).all()


def test_generate_sample_refuses_dpm_steps_T_on_a_linspace_saved_scheduler():
    """generate --steps T --sampler dpm++ on a saved DPM scheduler without (or with linspace) timestep_spacing must be refused up front."""
    from diffusers import DPMSolverMultistepScheduler

    from cxr_diffusion.sampling.generate import GenerateError, _sample

    warnings.simplefilter("ignore")
    # A saved DPMSolverMultistepScheduler config lacking timestep_spacing loads with diffusers' default, linspace.
    scheduler = DPMSolverMultistepScheduler.from_config({"num_train_timesteps": 10, "algorithm_type": "dpmsolver++",
                                                         "final_sigmas_type": "zero"})
    assert scheduler.config.timestep_spacing == "linspace"

    class Pipeline:
        def __init__(self):
            self.scheduler = scheduler

        def __call__(self, **kwargs):
            raise AssertionError("sampled a schedule with a repeated timestep (NaN images) instead of refusing --steps")

    with pytest.raises(GenerateError, match="--steps"):
        _sample(Pipeline(), torch.zeros(1, 1, 4), "model", 1, 3.0, 10, "dpm++", 0)


def test_random_split_with_two_patients_keeps_train_or_refuses():
    """Two patients and val/test fractions of 0.3 put one in val and one in test: train gets none, silently."""
    from cxr_diffusion.data.filter import _random_split
    from cxr_diffusion.errors import UserError

    rows = pd.DataFrame({"Patient ID": ["1", "1", "2"]})
    alive = pd.Series([True, True, True])
    try:
        split = _random_split(rows, alive, 0.3, 0.3, 0)
    except UserError:
        return  # refused with a message: fine
    assert (split == "train").any(), split.tolist()
