"""Stage `utility` (per branch): does training on a branch's synthetic chest X-rays help a classifier on real
ones? Train on synthetic, test on real, as Packhaeuser et al. 2023 and CheXGenBench measure it.

`utility_real` (real_arm.py) trains the real-only arm once, on a seeded subset of N real train images, and keeps its
probabilities on the real test split. `utility@<branch>` generates the branch's synthetic training set
from the conditions of those same N images, trains the synthetic-only arm (N), the real + synthetic arm
(N + N, mixed), the synthetic-then-real arm (pretrained on the N synthetic, fine-tuned on the N real, as
RoentGen-v2 measures it) and the scaled synthetic-only arms (k x N), scores every arm on the same real test images, and
reports per-class and macro AUROC with bootstrap intervals and the paired difference to the real-only arm,
and every arm's results by sex and age band (``subgroups``: AUROC, underdiagnosis and the gaps between groups).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cxr_diffusion.config import Params, UtilityClassifierConfig
from cxr_diffusion.conditioning.store import ConditionStore, check_store_branch
from cxr_diffusion.data.shards import PreparedImages, check_prepared_for
from cxr_diffusion.device import describe_device, resolve_device
from cxr_diffusion.io import atomic_directory, write_json
from cxr_diffusion.safe_text import shown_value
from cxr_diffusion.sampling.sample import load_pipeline, output_side
from cxr_diffusion.utility.arms import ArmImages, predict, train_arm
from cxr_diffusion.utility.chart import auroc_bars
from cxr_diffusion.utility.images import classifier_side, read_arm_images, train_subset
from cxr_diffusion.utility.real_arm import (REAL, REAL_ARM, SCORES, UtilityError, read_real_arm, macro_auroc_on_test,
                                            test_split, write_scores)
from cxr_diffusion.utility.statistics import auroc_with_intervals, paired_difference, patient_draws, seed_spread
from cxr_diffusion.utility.subgroups import group_order, subgroup_results, subgroups_of_films
from cxr_diffusion.utility.synthetic import write_synthetic_set


def _conditions_note(branch: str) -> str:
    if branch == "clip_text":
        return ("text only: each synthetic image is generated from the Finding Labels prompt of one of the N real "
                "train images, so label combinations follow the train set's frequencies; no image is seen")
    return ("variations of the training images: each synthetic image is conditioned on one of the N real train "
            "images (its embedding), so the set re-renders images the real arm already has; a weaker test than "
            "text-only generation")


PRETRAINED = "synthetic_then_real"


def _scaled_arm(k: int) -> str:
    return f"synthetic_x{k}"


def _score_arms(training_sets: dict[str, ArmImages], real: ArmImages, test: ArmImages, classes: list[str],
                config: UtilityClassifierConfig, seed: int, device: torch.device, branch: str) -> dict[str, np.ndarray]:
    """Every arm but the real one trained with ``seed``, and its probabilities on the test images. The
    synthetic arm's classifier is then fine-tuned on the real images: RoentGen-v2's synthetic-then-real arm."""
    scores = {}
    for arm, images in training_sets.items():
        model = train_arm(images, classes, config, seed, device, name=f"{branch} {arm}")
        scores[arm] = predict(model, test, config.batch_size, f"{branch} {arm}")
        if arm == "synthetic":
            model = train_arm(real, classes, config, seed, device, name=f"{branch} {PRETRAINED}", pretrained=model)
            scores[PRETRAINED] = predict(model, test, config.batch_size, f"{branch} {PRETRAINED}")
    return scores


def _check_same_classifier(recorded, wanted: dict, facts_path: Path) -> None:
    """Every arm is trained the same way: the real arm's classifier settings must be this run's."""
    if recorded == wanted:
        return
    if not isinstance(recorded, dict):
        difference = "it records no 'classifier' settings"
    else:
        key = next(k for k in sorted(set(recorded) | set(wanted)) if recorded.get(k) != wanted.get(k))
        difference = f"{key} {shown_value(recorded.get(key))}, utility.classifier.{key} is {shown_value(wanted.get(key))}"
    raise UtilityError(f"{facts_path}: the real arm was trained with another classifier ({difference}); rerun it "
                       f"with `dvc repro utility_real`")


def branch_utility(params: Params, branch: str, model_dir: Path, prepared_dir: Path, filtered_csv: Path,
                   store_dir: Path, real_dir: Path, out_dir: Path, figures_dir: Path, metrics_path: Path) -> dict:
    """Stage `utility@<branch>`: the synthetic set, the arms that use it, and every arm's AUROC on real test images."""
    started = time.perf_counter()
    torch.manual_seed(params.seed)
    device = resolve_device(params.device)
    config, utility = params.utility.classifier, params.utility
    train = PreparedImages(prepared_dir, "train", channels=1)
    test_names = PreparedImages(prepared_dir, "test", channels=1).image_indices
    classes = list(train.classes)
    real_facts, real_scores = read_real_arm(real_dir, classes, test_names, utility.seeds)
    _check_same_classifier(real_facts.get("classifier"), config.model_dump(mode="json"), real_dir / REAL_ARM)
    positions = train_subset(train, utility.train_images, params.seed)
    if [train.image_indices[p] for p in positions] != real_facts.get("train_image_indices"):
        raise UtilityError(f"{real_dir / REAL_ARM}: the real arm was trained on another subset of the train split "
                           "than this run draws; rerun it with `dvc repro utility_real`")
    store = ConditionStore(store_dir)
    check_store_branch(store, store_dir, branch)
    check_prepared_for(prepared_dir, params.image_size, params.filter.classes)  # what the synthetic set's manifest says
    subgroups = subgroups_of_films(filtered_csv, test_names, utility.age_bands)  # read before hours of generation
    pipeline = load_pipeline(model_dir, params.sample.sampler, device)
    if pipeline.config.branch != branch:
        raise UtilityError(f"{model_dir} holds a {pipeline.config.branch} model, not {branch}")
    if output_side(pipeline) != params.image_size:  # the synthetic set's manifest says image_size
        raise UtilityError(f"{model_dir} generates {output_side(pipeline)} px images but image_size is "
                           f"{params.image_size}; retrain it (dvc repro) after changing image_size")

    variations = max((1, *utility.scaling))
    with atomic_directory(out_dir) as tmp:
        generation = write_synthetic_set(pipeline, branch, train, positions, store, params,
                                         variations, tmp / "synthetic")
        del pipeline
        side = classifier_side(train.image_size, config.max_image_size)
        synthetic_images = PreparedImages(tmp / "synthetic", "train", channels=1)
        per_variation = generation["conditions"]
        synthetic_all = read_arm_images(synthetic_images, range(len(synthetic_images)), side, "synthetic set")
        real = read_arm_images(train, positions, side, "real arm")
        test = test_split(params, prepared_dir)

        def first(variations_used: int) -> ArmImages:
            rows = slice(0, variations_used * per_variation)
            return ArmImages(synthetic_all.pixels[rows], synthetic_all.labels[rows])

        training_sets = {"synthetic": first(1), "real_plus_synthetic": real + first(1)}
        training_sets.update({_scaled_arm(k): first(k) for k in sorted(utility.scaling)})

        def scores_with_seed(seed: int) -> dict[str, np.ndarray]:
            return _score_arms(training_sets, real, test.images, classes, config, seed, device, branch)

        scores = {REAL: real_scores, **scores_with_seed(params.seed)}
        write_scores(tmp / SCORES, scores, test_names, classes)
        seed_aurocs = {arm: [macro_auroc_on_test(test, arm_result)] for arm, arm_result in scores.items()}
        seed_aurocs[REAL] = real_facts["seed_macro_auroc"]
        for extra in range(1, utility.seeds):  # the spread of training itself, next to the test bootstrap's
            for arm, arm_result in scores_with_seed(params.seed + extra).items():
                seed_aurocs[arm].append(macro_auroc_on_test(test, arm_result))
        train_counts = {REAL: real_facts["train_images"], PRETRAINED: len(real) + per_variation,  # N synthetic, then N real
                        **{arm: len(images) for arm, images in training_sets.items()}}

    draws = patient_draws(test.patients, utility.bootstrap, params.seed)
    arms = {}
    for arm, arm_scores in scores.items():
        arms[arm] = {"train_images": train_counts[arm], **auroc_with_intervals(test.images.labels, arm_scores, classes,
                                                                     test.patients, utility.bootstrap, params.seed)}
        if arm != REAL:
            arms[arm]["vs_real"] = paired_difference(test.images.labels, arm_scores, real_scores, classes,
                                                     test.patients, utility.bootstrap, params.seed)
        arms[arm]["seeds"] = seed_spread(seed_aurocs[arm])
        arms[arm]["subgroups"] = subgroup_results(test.images.labels, arm_scores, classes, test.patients, subgroups,
                                                  group_order(utility.age_bands), draws)
    with atomic_directory(figures_dir) as tmp:
        auroc_bars(arms, classes, f"{branch}: train on synthetic, test on real (N = {real_facts['train_images']})",
                   tmp / "auroc.png")
    metrics = {"branch": branch, "train_images": real_facts["train_images"], "test_images": len(test.image_indices),
               "test_patients": len(set(test.patients)),
               "classes": classes, "classifier": config.architecture, "conditions": _conditions_note(branch),
               "synthetic_set": generation, "arms": arms, "device": describe_device(device),
               "seconds": round(time.perf_counter() - started, 1)}
    write_json(metrics_path, metrics)
    return {"branch": branch, **{arm: result["macro"] for arm, result in arms.items()}}
