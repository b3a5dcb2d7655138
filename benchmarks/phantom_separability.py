"""Can a small CNN tell the phantom's findings apart at 64 x 64, on patients it never saw?

Samples real NIH ChestX-ray14 studies (all follow-ups of each sampled patient), renders them with
the phantom renderer, splits by patient, trains a small multi-label CNN on CPU and prints
per-finding test AUROC as a markdown table. The five default classes must reach AUROC >= 0.9 for
the phantom to be a useful stand-in dataset.

    python benchmarks/phantom_separability.py --n-images 3000 --size 64 --epochs 12
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from cxr_diffusion.data.nih import split_labels
from cxr_diffusion.data.phantom.assets import PhantomAssets, load_phantom_assets, nih_metadata_csv
from cxr_diffusion.data.phantom.metadata import sample_phantom_metadata
from cxr_diffusion.data.phantom.render import PhantomStudy, render_study

NO_FINDING = "No Finding"
NODULE_MASS = "Nodule/Mass"
DEFAULT_CLASSES = ("Atelectasis", "Effusion", "Infiltration", NODULE_MASS, NO_FINDING)
OTHER_CLASSES = ("Cardiomegaly", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Hernia",
                 "Pleural_Thickening", "Pneumonia", "Pneumothorax")
CLASSES = DEFAULT_CLASSES + OTHER_CLASSES
PASS_AUROC = 0.9


@dataclass(frozen=True)
class BenchmarkConfig:
    n_images: int = 3000
    size: int = 64  # what the CNN sees
    render_size: int = 256  # rendered at this size, then downsampled with antialiasing
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    test_fraction: float = 0.2
    seed: int = 0
    workers: int = 2  # rendering processes (the machine has 2 cores)


def parse_args(argv: list[str] | None = None) -> BenchmarkConfig:
    defaults = BenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return BenchmarkConfig(**vars(parser.parse_args(argv)))


def studies_from_metadata(n_images: int, seed: int) -> list[PhantomStudy]:
    frame = sample_phantom_metadata(nih_metadata_csv(), n_images, seed)
    studies = []
    for row in frame.to_dict("records"):
        labels = split_labels(row["Finding Labels"])
        findings = () if labels == (NO_FINDING,) else labels
        studies.append(PhantomStudy(image_index=str(row["Image Index"]), patient_id=int(row["Patient ID"]),
                                    follow_up=int(row["Follow-up #"]), findings=tuple(findings),
                                    view=str(row["View Position"]), age=int(row["Patient Age"]),
                                    gender=str(row["Patient Gender"])))
    return studies


def label_matrix(studies: list[PhantomStudy]) -> np.ndarray:
    labels = np.zeros((len(studies), len(CLASSES)), dtype=np.float32)
    for i, study in enumerate(studies):
        present = set(study.findings)
        if present & {"Nodule", "Mass"}:
            present.add(NODULE_MASS)
        if not present:
            present.add(NO_FINDING)
        labels[i] = [name in present for name in CLASSES]
    return labels


_WORKER_ASSETS: PhantomAssets | None = None


def _render_one(args: tuple[PhantomStudy, int, int, int]) -> np.ndarray:
    study, render_size, size, seed = args
    assert _WORKER_ASSETS is not None, "assets must be loaded before the pool forks"
    image = Image.fromarray(render_study(study, _WORKER_ASSETS, render_size, seed))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def render_all(studies: list[PhantomStudy], config: BenchmarkConfig) -> np.ndarray:
    global _WORKER_ASSETS
    _WORKER_ASSETS = load_phantom_assets()
    jobs = [(study, config.render_size, config.size, config.seed) for study in studies]
    if config.workers > 1:
        # fork shares the already loaded lung masks with the workers instead of re-reading the zip.
        with multiprocessing.get_context("fork").Pool(config.workers) as pool:
            images = pool.map(_render_one, jobs, chunksize=32)
    else:
        images = [_render_one(job) for job in jobs]
    return np.stack(images)


def split_by_patient(studies: list[PhantomStudy], fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: every study of a held-out patient is in the test set."""
    patients = np.array(sorted({s.patient_id for s in studies}))
    rng = np.random.default_rng(seed)
    held_out = set(rng.choice(patients, size=max(1, int(round(fraction * len(patients)))), replace=False).tolist())
    return np.array([s.patient_id in held_out for s in studies])


class SmallCnn(nn.Module):
    def __init__(self, n_outputs: int, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.MaxPool2d(2),
            block(4 * width, 8 * width), block(8 * width, 8 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8 * width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Small shifts only: the renderer already varies exposure, positioning and anatomy.
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
    return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))


def train_and_score(images: np.ndarray, labels: np.ndarray, test: np.ndarray,
                    config: BenchmarkConfig) -> np.ndarray:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    mean, std = x[~torch.from_numpy(test)].mean(), x[~torch.from_numpy(test)].std()
    x = (x - mean) / std
    y = torch.from_numpy(labels)
    train_idx = torch.from_numpy(np.flatnonzero(~test))
    test_idx = torch.from_numpy(np.flatnonzero(test))
    model = SmallCnn(len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * int(np.ceil(len(train_idx) / config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(config.epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            logits = model(_augment(x[batch], generator))
            loss = loss_fn(logits, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        print(f"epoch {epoch + 1}/{config.epochs}: train loss {total / len(order):.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        scores = torch.cat([torch.sigmoid(model(x[test_idx[i:i + 256]])) for i in range(0, len(test_idx), 256)])
    return scores.numpy()


def auroc_table(labels: np.ndarray, scores: np.ndarray) -> tuple[str, bool]:
    rows = ["| finding | n_pos_test | AUROC | pass |", "|---|---:|---:|---|"]
    all_pass = True
    for j, name in enumerate(CLASSES):
        positives = int(labels[:, j].sum())
        if 0 < positives < len(labels):
            auroc = float(roc_auc_score(labels[:, j], scores[:, j]))
            auroc_text = f"{auroc:.3f}"
        else:
            auroc, auroc_text = float("nan"), "n/a"
        if name in DEFAULT_CLASSES:
            passed = auroc >= PASS_AUROC
            all_pass &= passed
            verdict = "yes" if passed else "NO"
        else:
            verdict = "(reported)"
        rows.append(f"| {name} | {positives} | {auroc_text} | {verdict} |")
    return "\n".join(rows), all_pass


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))
    print(config)
    studies = studies_from_metadata(config.n_images, config.seed)
    labels = label_matrix(studies)
    test = split_by_patient(studies, config.test_fraction, config.seed)
    print(f"{len(studies)} studies of {len({s.patient_id for s in studies})} patients; "
          f"{int(test.sum())} test studies", flush=True)
    render_start = time.perf_counter()
    images = render_all(studies, config)
    render_seconds = time.perf_counter() - render_start
    print(f"rendered in {render_seconds:.1f} s ({1000 * render_seconds * config.workers / len(studies):.1f} ms "
          f"per image per worker at {config.render_size} px)", flush=True)
    scores = train_and_score(images, labels, test, config)
    table, all_pass = auroc_table(labels[test], scores)
    print()
    print(table)
    print()
    print(f"default classes pass (AUROC >= {PASS_AUROC}): {'yes' if all_pass else 'NO'}")
    print(f"runtime: {time.perf_counter() - started:.1f} s")
    return 0 if all_pass else 1


if __name__ == "__main__":
    raise SystemExit(main())
