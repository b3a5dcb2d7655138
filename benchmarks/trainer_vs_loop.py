"""The project's trainer against a bare training loop: same UNet, batch, precision and device, same run.

    python benchmarks/trainer_vs_loop.py                    # CPU: the default profile (pixel space)
    python benchmarks/trainer_vs_loop.py --profile nih-512  # GPU: latent space, the SD-1.5-sized UNet

The bare loop is ``train_throughput.py``'s ``time_steps`` (UNet forward, loss, backward, AdamW on one batch
held on the device: no data, no EMA, no logging). The trainer is ``train_branch`` on a synthetic set in the
pipeline's formats (prepared shards and a condition store; in latent space also the latent store, made by
stage encode_latents' own code with a random-weight VAE of the SD VAE's architecture): data, condition
adapter, EMA, lagged logging, DVCLive. Its rate is after the first optimizer step, validation and
checkpoints left out. The ratio says what the pipeline around the step costs; the data wait what share of
the trainer's time went to waiting for batches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu_check"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table
from synthetic_data import CONDITION_DIM, build_training_set, write_condition_store, write_prepared
from train_throughput import time_steps

from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion.precision import describe_machine
from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch
from cxr_diffusion.diffusion.unet import build_unet
from cxr_diffusion.rehearsal.standin_models import write_vae

TOKENS = 32  # the elixr branch's condition: (32, 768)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each (one more warms up)")
    parser.add_argument("--batch", type=int, default=None, help="images per optimizer step (default: the profile's "
                                                                 "micro-batch; one micro-batch per step)")
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "no"
    base = params_with(profile=args.profile)
    batch = args.batch or base.train.batch_size
    latent = base.train.space == "latent"
    with tempfile.TemporaryDirectory(prefix="trainer-vs-loop-") as scratch:
        root = Path(scratch)
        train = {"batch_size": batch, "gradient_accumulation": 1, "max_steps": args.steps + 1, "mixed_precision": precision,
                 "compile": "never", "val_every_steps": 1_000_000, "val_images": 8, "sample_grid_images": 0,
                 "checkpoint_every_steps": None, "num_workers": 0 if device.type == "cpu" else base.train.num_workers}
        if latent:
            train["vae"] = str(write_vae(root / "vae", seed=0))
        params = params_with({"device": device.type, "train": train}, profile=args.profile)
        images = (args.steps + 1) * batch
        started = time.perf_counter()
        if latent:
            data = build_training_set(root / "data", params, images, 8, TOKENS, device)
        else:
            names = write_prepared(root / "data" / "prepared", params.image_size, {"train": images, "val": 8},
                                   tuple(params.filter.classes))
            write_condition_store(root / "data" / "store", names, TOKENS)
            data = {"prepared": root / "data" / "prepared", "store": root / "data" / "store", "latents": None}
        print(f"synthetic set of {images} images: {time.perf_counter() - started:.1f} s", flush=True)
        paths = TrainPaths(prepared=data["prepared"], store=data["store"], clip=None, model_out=root / "model",
                           checkpoints=root / "checkpoints", live=root / "live", latents=data["latents"])
        result = train_branch(params, "elixr", paths)

    size, channels = (params.image_size // 8, 4) if latent else (params.image_size, params.channels)
    dim = params.train.unet.cross_attention_dim or CONDITION_DIM
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(batch, channels, size, size, generator=generator).to(device),
              torch.randint(0, 1000, (batch,), generator=generator).to(device),
              torch.randn(batch, TOKENS, dim, generator=generator).to(device))
    torch.manual_seed(0)
    unet = build_unet(params.train.unet, size, channels, dim).to(device)
    loop = time_steps(unet, inputs, args.steps, 1, None if precision == "no" else precision, device)

    machine = describe_machine()
    print(f"\nprofile '{args.profile}': UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, input "
          f"{channels}x{size}x{size}, condition {TOKENS}x{dim}, batch {batch}, precision {precision}, "
          f"{args.steps} timed steps; device {machine['device']}, {machine['threads']} threads\n")
    rows = [["bare loop (train_throughput.time_steps)", f"{loop:.1f}", "1.00", "-"],
            ["train_branch (the train stage's trainer)", f"{result['img_per_s']:.1f}",
             f"{result['img_per_s'] / loop:.2f}", f"{result['data_wait_fraction']:.1%}"]]
    print(markdown_table(["variant", "img/s", "ratio to the bare loop", "data wait"], rows))


if __name__ == "__main__":
    main()
