"""Throughput of the pretrained evaluators (Inception for FID, torchxrayvision DenseNet, RadDINO) and what TF32 does to FID.

For each network: images per second of the full path the evaluate stage runs (uint8 / [-1, 1] images at the
prepared resolution -> resize (RadDINO: CheXGenBench's bytes and its image processor) -> network) against a bare forward pass on inputs already at the network's size,
measured in the same run (ratio = how much the preprocessing costs). On a GPU it also computes the standard FID
of two fixed image sets with TF32 convolutions allowed (PyTorch's default) and disallowed, and runs the
evaluate stage's functions (standard FID, reference-compatible FID, DenseNet metrics) end to end on the device.
Weights are the parity tests' deterministic random ones (the published ones cannot be fetched here): throughput
does not depend on them, and FID values are only comparable within this run.

    python benchmarks/pretrained_evaluator_throughput.py --size 512 --images 64 --batch 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _measure import markdown_table
from oracle_weights import seeded_state

from cxr_diffusion.config import EvaluateConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.evaluation.inception import INPUT_SIZE, InceptionSpec, InceptionV3
from cxr_diffusion.evaluation.raddino import chexgenbench_bytes
from cxr_diffusion.evaluation.weights import full_fp32
from cxr_diffusion.evaluation.xrv_densenet import XRVDenseNet121


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def images_per_second(run, batches: list[torch.Tensor], device: torch.device) -> float:
    run(batches[0])  # warm-up (cuDNN autotuning, allocator)
    _synchronize(device)
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    _synchronize(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


class _Images(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index]}


def _raddino(folder: Path, device: torch.device):
    """RadDINO's architecture and image processor with seeded random weights, loaded as the evaluate stage does."""
    from cxr_diffusion.evaluation.raddino import load_raddino
    from cxr_diffusion.rehearsal.standin_models import write_raddino

    write_raddino(folder, seed=0)
    return load_raddino(str(folder), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="prepared image size")
    parser.add_argument("--images", type=int, default=64, help="images per timed pass")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--functions", action="store_true",
                        help="also run the evaluate-stage functions on a CPU (always done on a GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    print(f"device: {device} ({name}), torch {torch.__version__}, {args.images} images of {args.size}x{args.size}")
    generator = torch.Generator().manual_seed(0)
    count = max(1, args.images // args.batch)
    # Smooth random images (upsampled 8x8 noise), half of them with lower contrast: two different sets for FID.
    coarse = torch.rand(count * args.batch, 1, 8, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(args.size, args.size), mode="bicubic").clamp(0, 1)
    smooth[len(smooth) // 2:] = 0.5 + 0.6 * (smooth[len(smooth) // 2:] - 0.5)
    uint8 = list((smooth * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).to(device).split(args.batch))
    signed = [b.float() / 127.5 - 1.0 for b in uint8]

    inception, densenet = InceptionV3(InceptionSpec("fid", "pool")), XRVDenseNet121()
    for model in (inception, densenet):  # well-scaled deterministic weights, as in the parity tests
        model.load_state_dict({k: v.float() for k, v in seeded_state(model).items()}, strict=False)
    inception, densenet = inception.eval().to(device), densenet.eval().to(device)
    at_299 = [torch.randn(args.batch, 3, INPUT_SIZE, INPUT_SIZE, device=device) for _ in range(count)]
    at_224 = [torch.randn(args.batch, 1, 224, 224, device=device) for _ in range(count)]
    raddino_dir = tempfile.TemporaryDirectory()
    raddino = _raddino(Path(raddino_dir.name), device)
    at_518 = [torch.randn(args.batch, 3, 518, 518, device=device) for _ in range(count)]

    def raddino_path(batch: torch.Tensor) -> torch.Tensor:
        inputs = raddino.processor(images=chexgenbench_bytes(batch.cpu()), return_tensors="pt")
        return raddino.model(pixel_values=inputs["pixel_values"].to(device)).pooler_output

    rows = []
    for label, full, bare in (
        ("Inception-v3 (FID flavour)", (inception, uint8), (inception.pool_features, at_299)),
        ("torchxrayvision DenseNet-121", (densenet, signed), (densenet.pooled_features, at_224)),
        ("RadDINO (DINOv2 ViT-B/14, 518 px)", (raddino_path, signed),
         (lambda batch: raddino.model(pixel_values=batch).pooler_output, at_518)),
    ):
        with full_fp32():  # as the evaluate stage runs them
            full_rate = images_per_second(full[0], full[1], device)
            bare_rate = images_per_second(bare[0], bare[1], device)
        rows.append([label, f"{full_rate:.1f}", f"{bare_rate:.1f}", f"{full_rate / bare_rate:.2f}"])
    print(markdown_table(["network (fp32, no TF32)", f"evaluate path img/s ({args.size}px in)",
                          "bare forward img/s", "ratio"], rows))
    raddino_dir.cleanup()

    if device.type != "cuda" and not args.functions:
        return
    from cxr_diffusion.evaluation.inception_fid import reference_compatible_fid, standard_fid
    from cxr_diffusion.evaluation.xrv_metrics import xrv_metrics

    everything = torch.cat(signed).cpu()
    real, fake = _Images(everything[: len(everything) // 2]), _Images(everything[len(everything) // 2:])
    if device.type == "cuda":
        # TF32: PyTorch lets cuDNN convolutions use TF32 by default; FID from such features differs slightly.
        # (frechet_inception_distance itself always turns TF32 off, so the comparison drives torchmetrics here.)
        from torchmetrics.image.fid import FrechetInceptionDistance

        values = {}
        for allow in (True, False):
            torch.backends.cudnn.allow_tf32 = allow
            metric = FrechetInceptionDistance(feature=inception, normalize=False).to(device)
            with torch.no_grad():
                for pixels, is_real in ((real.pixels, True), (fake.pixels, False)):
                    for batch in pixels.split(args.batch):
                        metric.update(((batch + 1) * 127.5).round().to(torch.uint8).to(device), real=is_real)
            values[allow] = float(metric.compute())
        torch.backends.cudnn.allow_tf32 = True
        print(f"standard FID of two fixed sets: TF32 allowed {values[True]:.6f}, fp32 {values[False]:.6f}, "
              f"relative difference {abs(values[True] - values[False]) / abs(values[False]):.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        torchvision_flavour = InceptionV3(InceptionSpec("torchvision", "pool"))
        torchvision_flavour.load_state_dict(seeded_state(torchvision_flavour), strict=False)
        for key, model in (("fid", inception), ("torchvision", torchvision_flavour), ("xrv", densenet)):
            paths[key] = Path(tmp) / f"{key}.safetensors"
            save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(paths[key]))
        config = profile_section(EvaluateConfig, inception_weights=str(paths["fid"]),
                                     reference_inception_weights=str(paths["torchvision"]), xrv_weights=str(paths["xrv"]),
                                     inception_batch_size=args.batch, bootstrap=50)
        started = time.perf_counter()
        standard = standard_fid(config, fake, real, args.size, device)
        reference = reference_compatible_fid(config, fake, real, args.size, device)
        labels = (torch.arange(len(fake))[:, None] % 2 == torch.tensor([0, 1])).int().numpy()
        judge = xrv_metrics(config, {"Effusion": ("Effusion",), "Nodule/Mass": ("Nodule", "Mass")}, fake, labels,
                            real, labels[: len(real)], real, seed=0, device=device)
        print(f"evaluate-stage functions on {device}: standard FID {standard['value']:.4f}, reference-compatible "
              f"FID {reference['value']:.4f}, DenseNet FD {judge['fd']:.4f} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
