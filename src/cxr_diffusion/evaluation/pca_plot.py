"""One picture of where generated features sit relative to real ones: both sets on the real-and-generated PCA plane."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from cxr_diffusion.evaluation.distances import as_feature_matrix
from cxr_diffusion.io import atomic_path


def pca_scatter(real: np.ndarray, generated: np.ndarray, title: str, path: Path) -> Path:
    """Fit PCA(2) on real and generated together, scatter both, save a PNG at ``path`` atomically; return ``path``."""
    real = as_feature_matrix(real, "real")
    generated = as_feature_matrix(generated, "generated")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimension mismatch: real has d={real.shape[1]}, "
                         f"generated has d={generated.shape[1]}; embed both with the same extractor")
    combined = np.concatenate([real, generated])
    if min(combined.shape) < 2:
        raise ValueError(f"pca_scatter: PCA(2) needs at least 2 rows and 2 feature dimensions, got {combined.shape}")
    # "full" SVD so the same features always give the same picture (the randomized solver depends on a seed).
    pca = PCA(n_components=2, svd_solver="full").fit(combined)
    real_2d, generated_2d = pca.transform(real), pca.transform(generated)
    explained = pca.explained_variance_ratio_ * 100.0

    # A bare Figure on the Agg canvas: no pyplot global state, no display needed.
    figure = Figure(figsize=(6, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(real_2d[:, 0], real_2d[:, 1], s=8, alpha=0.5, c="tab:blue", marker="o", label=f"real (n={len(real)})")
    axes.scatter(generated_2d[:, 0], generated_2d[:, 1], s=10, alpha=0.5, c="tab:orange", marker="^",
                 label=f"generated (n={len(generated)})")
    axes.set_xlabel(f"PC1 ({explained[0]:.1f}% of variance)")
    axes.set_ylabel(f"PC2 ({explained[1]:.1f}% of variance)")
    axes.set_title(title)
    axes.legend(loc="best")
    figure.tight_layout()

    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")  # the temp name ends in .tmp, so name the format
    return path
