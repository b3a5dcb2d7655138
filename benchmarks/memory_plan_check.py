"""The training memory plan's predictions against measured peaks, and its plans for common cards.

    python benchmarks/memory_plan_check.py > benchmarks/results/memory_plan_check_cpu.md

Measured on the CPU: real training steps of small UNets (two optimizer steps of two micro-batches,
fused AdamW, as the trainer runs them) under torch.profiler's memory profile, whose allocation and free
events summed in time order give the peak of allocated bytes from before the model exists; that is
what torch.cuda.max_memory_allocated reports on a GPU. The predictions use CPU autocast rules there.
The SD-1.5 rows compare the CUDA prediction with the H200 figures of gpu_nih512_h200_memory.txt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table

from cxr_diffusion.config import UNetConfig
from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion.memory_plan import (
    BUDGET_HEADROOM, GIB, MemoryPlanError, measure_activations, plan_memory, predict_parts, unet_parameters,
)
from cxr_diffusion.diffusion.unet import build_unet, sd15_unet_config

SD_VAE_PARAMETERS = 83_653_863  # AutoencoderKL of stabilityai/sd-vae-ft-mse (128/256/512/512, 2 layers)
# Total memory as torch.cuda reports it (GiB), roughly: what a plan is made for.
CARDS = {"80 GB (H100 / A100 80GB)": 79.6, "48 GB (RTX A6000)": 47.5, "40 GB (A100 40GB)": 39.6,
         "24 GB (RTX 4090)": 23.6}
H200_PEAKS_GIB = {"bf16": 89.7, "no": 126.3}  # gpu_nih512_h200_memory.txt: batch 64, no EMA, no VAE
TINY = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(False, True),
                  attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32, timestep_condition=False)
SMALL = UNetConfig(block_out_channels=(64, 128, 128), layers_per_block=2, cross_attention=(True, True, False),
                   attention_head_dim=8, norm_num_groups=32, cross_attention_dim=64, timestep_condition=False)
CHANNELS, TOKENS = 4, 8


def measured_step_peak(unet_config: UNetConfig, sample_size: int, batch: int, precision: str,
                       checkpointing: bool) -> int:
    """Peak allocated bytes of a real CPU training run of this UNet: two optimizer steps of two micro-batches."""
    dim = unet_config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        unet = build_unet(unet_config, sample_size, CHANNELS, dim).train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
        images = torch.randn(batch, CHANNELS, sample_size, sample_size, generator=generator)
        condition = torch.randn(batch, TOKENS, dim, generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        for _ in range(2):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "no"):
                    prediction = unet(images, timesteps, encoder_hidden_states=condition).sample
                    loss = F.mse_loss(prediction.float(), images)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    allocated = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        allocated += event.nbytes()  # negative for a free
        peak = max(peak, allocated)
    return peak


def predicted_step_peak(unet_config: UNetConfig, sample_size: int, batch: int, precision: str,
                        checkpointing: bool, device_type: str = "cpu", condition_tokens: int = TOKENS) -> int:
    """The plan's prediction for the same run (no EMA, no VAE)."""
    dim = unet_config.cross_attention_dim
    activations = measure_activations(unet_config, sample_size, CHANNELS, dim, condition_tokens, precision,
                                      checkpointing, device_type)
    parts = predict_parts(unet_parameters(unet_config, sample_size, CHANNELS, dim), activations, batch,
                          ema_on_device=False)
    return sum(parts.values())


def check_rows() -> list[list[object]]:
    rows = []
    cases = [(TINY, 16, batch) for batch in (4, 16)] + [(SMALL, 32, batch) for batch in (4, 8)]
    for config, size, batch in cases:
        for precision in ("no", "bf16"):
            for checkpointing in (False, True):
                name = (f"{'/'.join(map(str, config.block_out_channels))} at {size}x{size}, batch {batch}, "
                        f"{'fp32' if precision == 'no' else 'bf16 autocast'}{', checkpointing' * checkpointing}")
                predicted = predicted_step_peak(config, size, batch, precision, checkpointing)
                measured = measured_step_peak(config, size, batch, precision, checkpointing)
                rows.append([name, f"{predicted / 2**20:.1f} MiB", f"{measured / 2**20:.1f} MiB",
                             f"{predicted / measured:.3f}"])
    for precision, measured_gib in H200_PEAKS_GIB.items():
        predicted = predicted_step_peak(sd15_unet_config(), 64, 64, precision, False, "cuda", condition_tokens=77)
        rows.append([f"SD-1.5 (320/640/1280/1280) at 64x64, 77x768 condition, batch 64, "
                     f"{'fp32' if precision == 'no' else 'bf16 autocast'} (CUDA rules) vs the H200",
                     f"{predicted / GIB:.1f} GiB", f"{measured_gib:.1f} GiB", f"{predicted / (measured_gib * GIB):.3f}"])
    return rows


def card_plans(condition_tokens: int = 77) -> str:
    """The nih-512 profile's plans (bf16, the clip_text branch's 77 tokens: the largest condition)."""
    params = params_with(profile="nih-512")
    blocks = []
    for card, total_gib in CARDS.items():
        budget = int(total_gib * GIB * BUDGET_HEADROOM)
        try:
            plan = plan_memory(params.train, 64, 4, params.train.unet.cross_attention_dim, condition_tokens,
                               "bf16", budget, SD_VAE_PARAMETERS)
            blocks.append(f"### {card}: {total_gib} GiB total\n\n```\n{plan.describe()}\n```")
        except MemoryPlanError as error:
            blocks.append(f"### {card}: {total_gib} GiB total\n\n{error}")
    return "\n\n".join(blocks)


def main() -> None:
    print("$ python benchmarks/memory_plan_check.py > benchmarks/results/memory_plan_check_cpu.md\n")
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("## Predicted vs measured peak of a training step (weights, gradients, AdamW, activations)\n")
    print(markdown_table(["case", "predicted", "measured", "ratio"], check_rows()))
    print(f"\n## nih-512 plans (bf16, 256 images per optimizer step, budget {BUDGET_HEADROOM} x the card)\n")
    print(card_plans())
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
