"""Training-step throughput: our step vs a plain fp32 PyTorch loop, same UNet and batch, same run.

    python benchmarks/train_throughput.py                      # CPU, the default profile's UNet at 32x32
    python benchmarks/train_throughput.py --profile nih-512    # the reference UNet (GPU; prints the card)

Reports images/s of each variant and its ratio to the plain fp32 loop, the fraction of step time
spent waiting for data (DataLoader over the real prepared shards, when --prepared is given), and
model FLOP utilisation against a large bf16 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table

from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion.precision import choose_mixed_precision, describe_machine
from cxr_diffusion.diffusion.unet import build_unet



def matmul_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(unet, batch: tuple) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        unet(*batch[:2], encoder_hidden_states=batch[2]).sample.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_steps(unet, batch, steps: int, warmup: int, autocast: str | None, device: torch.device) -> float:
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    context = (torch.autocast(device.type, dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)
               if autocast else contextlib.nullcontext())
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            started = time.perf_counter()
        with context:
            loss = unet(batch[0], batch[1], encoder_hidden_states=batch[2]).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return batch[0].shape[0] * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", help="shipped profile whose train.unet is measured (src/cxr_diffusion/profiles/<name>.yaml)")
    parser.add_argument("--batch", type=int, default=None, help="default: the profile's train.batch_size")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=None, help="condition tokens (default: 77 for nih-512, 32 else)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    params = params_with(profile=args.profile)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent = params.train.space == "latent"
    size = params.image_size // 8 if latent else params.image_size
    channels = 4 if latent else params.channels
    dim = params.train.unet.cross_attention_dim or 128
    tokens = args.tokens or (77 if args.profile == "nih-512" else 32)
    batch_size = args.batch or params.train.batch_size
    machine = describe_machine()
    print(f"device: {machine['device']}; cpu capability {machine['cpu_capability']}, amx_bf16 {machine['amx_bf16']}, "
          f"threads {machine['threads']}")
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, channels, size, size, generator=generator).to(device),
             torch.randint(0, 1000, (batch_size,), generator=generator).to(device),
             torch.randn(batch_size, tokens, dim, generator=generator).to(device))

    def fresh_unet():
        torch.manual_seed(0)
        return build_unet(params.train.unet, size, channels, dim).to(device)

    unet = fresh_unet()
    parameters = sum(p.numel() for p in unet.parameters())
    flops_per_image = step_flops(unet, batch) / batch_size
    peak = matmul_tflops(device, 8192 if device.type == "cuda" else 2048)
    precision = choose_mixed_precision(params.train.mixed_precision, device)
    variants = [("plain fp32 loop", None, False)]
    variants.append((f"our step (mixed_precision auto -> {precision})", None if precision == "no" else precision, False))
    variants.append(("fp32 + channels_last", None, True))
    if device.type == "cuda" or machine["amx_bf16"]:
        variants.append(("bf16 autocast + channels_last", "bf16", True))
    rows, baseline = [], None
    for name, autocast, channels_last in variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = fresh_unet()
        inputs = batch
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        images_per_second = time_steps(model, inputs, args.steps, 2, autocast, device)
        baseline = baseline or images_per_second
        utilisation = images_per_second * flops_per_image / (peak * 1e12)
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
        rows.append([name, f"{images_per_second:.1f}", f"{images_per_second / baseline:.2f}", f"{utilisation:.1%}",
                     memory])
        del model
    if args.compile:
        model = torch.compile(fresh_unet())
        images_per_second = time_steps(model, batch, args.steps, 3, None if precision == "no" else precision, device)
        rows.append(["torch.compile", f"{images_per_second:.1f}", f"{images_per_second / baseline:.2f}",
                     f"{images_per_second * flops_per_image / (peak * 1e12):.1%}", "-"])
    print(f"\nUNet of profile '{args.profile}': {parameters / 1e6:.1f}M parameters, input {channels}x{size}x{size}, "
          f"condition {tokens}x{dim}, batch {batch_size}; {flops_per_image / 1e9:.2f} GFLOP per image (fwd+bwd); "
          f"bf16 matmul peak measured {peak:.1f} TFLOP/s\n")
    print(markdown_table(["variant", "img/s", "ratio to plain fp32", "model FLOP utilisation",
                          "peak GPU memory (GiB, model + AdamW + activations)"], rows))
    if args.profile == "nih-512":
        best = max(float(r[1]) for r in rows)
        print(f"\nnih-512 epoch (48,311 images) at the best rate: {48311 / best / 60:.1f} min per epoch on this device")


if __name__ == "__main__":
    main()
