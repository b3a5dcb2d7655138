"""Mixed precision per machine and per model: a timing probe of the model's own layers decides on a CPU."""

from __future__ import annotations

import pytest
import torch

from cxr_diffusion.device import DeviceError, claim_device, half_dtype
from cxr_diffusion.diffusion.precision import BF16_MIN_SPEEDUP, choose_mixed_precision, unet_block_speedup

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def never_called() -> float:
    raise AssertionError("the probe ran where nothing needed it")


@pytest.mark.parametrize("requested", ["no", "bf16", "fp16"])
def test_an_explicit_choice_is_kept_and_nothing_is_probed(requested):
    assert choose_mixed_precision(requested, CPU, cpu_speedup=never_called) == requested


@pytest.mark.parametrize(("speedup", "expected"), [(BF16_MIN_SPEEDUP + 0.5, "bf16"), (BF16_MIN_SPEEDUP - 0.01, "no"),
                                                   (0.05, "no")])
def test_auto_on_a_cpu_takes_bf16_only_when_the_probe_measured_it_faster(speedup, expected):
    assert choose_mixed_precision("auto", CPU, cpu_speedup=lambda: speedup) == expected


def test_auto_on_a_cpu_without_a_probe_is_fp32():
    assert choose_mixed_precision("auto", CPU) == "no"


@pytest.mark.parametrize(("card", "capability", "expected"), [
    ("V100", (7, 0), "fp16"), ("T4", (7, 5), "fp16"), ("A100", (8, 0), "bf16"), ("RTX 4090", (8, 9), "bf16"),
    ("H100", (9, 0), "bf16")])
def test_auto_on_a_gpu_takes_bf16_only_where_the_card_computes_it_natively(monkeypatch, card, capability, expected):
    # torch.cuda.is_bf16_supported() answers True on a V100 or T4 through emulation: it must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose_mixed_precision("auto", CUDA, cpu_speedup=never_called) == expected, card
    assert half_dtype(CUDA) == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_cuda_n_becomes_the_current_device_of_a_one_process_run(monkeypatch):
    claimed = []
    monkeypatch.setattr(torch.cuda, "set_device", claimed.append)
    claim_device(torch.device("cuda:1"), processes=1)
    claim_device(torch.device("cuda"), processes=4)  # plain cuda: accelerate places each process
    claim_device(CPU, processes=1)
    assert claimed == [torch.device("cuda:1")]


def test_cuda_n_with_several_processes_is_refused_naming_the_param(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_device", never_called)
    with pytest.raises(DeviceError, match="'device' is 'cuda:1'.*2 processes"):
        claim_device(torch.device("cuda:1"), processes=2)


def test_block_probe_times_a_real_block_in_both_precisions(monkeypatch):
    autocast_states = []
    real_forward = torch.nn.Conv2d.forward

    def spy(self, x):
        autocast_states.append(torch.is_autocast_cpu_enabled() if hasattr(torch, "is_autocast_cpu_enabled")
                               else torch.is_autocast_enabled("cpu"))
        return real_forward(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    speedup = unet_block_speedup(channels=8, norm_groups=4, size=8, batch=2, repeats=1)

    assert speedup > 0
    assert True in autocast_states and False in autocast_states


def test_images_are_decoded_in_workers_beside_a_gpu_and_in_the_main_process_on_a_cpu(monkeypatch):
    import os

    from cxr_diffusion.device import MAX_DECODE_WORKERS, decode_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert decode_workers(CUDA) == MAX_DECODE_WORKERS
    assert decode_workers(CPU) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert decode_workers(CUDA) == 2
