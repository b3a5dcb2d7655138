"""Pass 30 (metrics sweep): degenerate but legitimate inputs to the evaluation metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cxr_diffusion.config import EvaluateConfig
from cxr_diffusion.errors import UserError
from cxr_diffusion.profiles import profile_section
from oracle_weights import seeded_state
from test_xrv_densenet import _Images


def _null_or_user_error(call):
    """The result of ``call``, or None where it raised a UserError (a one-line error); any other error fails."""
    try:
        return call()
    except UserError:
        return None


def test_xrv_weights_holding_nan_are_one_line_or_null_not_a_traceback(tmp_path):
    """A torchxrayvision DenseNet file holding NaN gave NaN features and a ValueError traceback deep in frechet_distance
    (RadDINO says 'features that are not finite' in one line); expected: a UserError naming the file, or fd null."""
    from cxr_diffusion.evaluation.xrv_densenet import XRVDenseNet121
    from cxr_diffusion.evaluation.xrv_metrics import xrv_metrics

    state = {k: v.float() for k, v in seeded_state(XRVDenseNet121()).items()}
    state["features.norm5.weight"] = torch.full_like(state["features.norm5.weight"], float("nan"))
    path = tmp_path / "xrv.safetensors"
    save_file(state, str(path))
    members = {"Infiltration": ("Infiltration",), "Nodule/Mass": ("Nodule", "Mass")}
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    config = profile_section(EvaluateConfig, xrv_weights=str(path), bootstrap=10, inception_batch_size=4)
    result = _null_or_user_error(lambda: xrv_metrics(config, members, _Images(4, 0), labels, _Images(4, 1), labels,
                                                     _Images(4, 2), 0, torch.device("cpu")))
    assert result is None or result["fd"] is None


def test_inception_weights_holding_nan_do_not_crash_the_process_or_report_a_nan_fid(tmp_path):
    """FID-Inception weights holding NaN give NaN features; torchmetrics' eigvals on the NaN covariance product
    segfaults the whole evaluate process on the CPU (MKL DGEBAL). Expected: a UserError naming the file, or
    value null with a reason, checked before the features reach eigvals (run in a child process: it crashes)."""
    from cxr_diffusion.evaluation.inception import InceptionSpec, InceptionV3

    state = {k: v.float() for k, v in seeded_state(InceptionV3(InceptionSpec("fid", "pool"))).items()}
    key = next(k for k in state if k.endswith("bn.weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    path = tmp_path / "fid.safetensors"
    save_file(state, str(path))
    child = textwrap.dedent(f"""
        import json, math, sys, torch
        from cxr_diffusion.config import EvaluateConfig
        from cxr_diffusion.errors import UserError
        from cxr_diffusion.profiles import profile_section
        from cxr_diffusion.evaluation.inception_fid import standard_fid
        class Images(torch.utils.data.Dataset):
            def __init__(self, seed):
                self.images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
            def __len__(self):
                return 3
            def __getitem__(self, index):
                return {{"pixel_values": self.images[index]}}
        config = profile_section(EvaluateConfig, inception_weights={str(path)!r}, inception_batch_size=4)
        try:
            value = standard_fid(config, Images(0), Images(1), 32, torch.device("cpu"))["value"]
        except UserError as error:
            print("USER-ERROR", error)
            sys.exit(0)
        print("VALUE", value)
        sys.exit(0 if value is None or math.isfinite(value) else 3)
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stdout[-500:], result.stderr[-500:])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_real_pair_cosine_never_pairs_an_image_with_itself(seed):
    """faithfulness_metrics' 'feature_cosine_random_real_pairs' pairs test rows by a plain permutation, whose fixed
    points pair an image with itself (cosine 1): with 2 test images and seed 0 the baseline reads 1.0 though the two
    images are orthogonal. Expected: a derangement (no self-pairs), so the baseline is 0.0 here."""
    from cxr_diffusion.evaluation.evaluate import SplitEmbedding, faithfulness_metrics

    features = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    split = SplitEmbedding(features=features, probabilities=np.array([[0.2, 0.7], [0.6, 0.1]]),
                           labels=np.array([[0, 1], [1, 0]]), pixels=np.zeros((2, 8, 8), dtype=np.float32),
                           image_index=np.array(["a.png", "b.png"]))
    result = faithfulness_metrics(split, split, ["Effusion", "Mass"], 10, seed)
    assert result["feature_cosine_random_real_pairs"] == pytest.approx(0.0)


def test_an_evaluator_feature_dim_the_params_accept_does_not_crash_the_pca_figure(tmp_path):
    """params accept evaluator.feature_dim=1, but evaluate's pca.png (pca_scatter) then raises a bare ValueError
    after every metric is computed, so no metrics file is written. Expected: the params refuse feature_dim < 2
    (one line at params time), or pca_scatter draws the 1-d features."""
    from cxr_diffusion.config import EvaluatorConfig, ParamsError
    from cxr_diffusion.evaluation.pca_plot import pca_scatter

    try:
        profile_section(EvaluatorConfig, feature_dim=1)
    except ParamsError:
        return
    rng = np.random.default_rng(0)
    path = pca_scatter(rng.normal(size=(4, 1)), rng.normal(size=(4, 1)), "1-d", tmp_path / "pca.png")
    assert path.is_file()
