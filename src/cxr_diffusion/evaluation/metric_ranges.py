"""The ranges the numbers of the metrics files `compare` reads can take, checked before the report is written.

The stages write each number from its definition (an AUROC is in [0, 1], a Frechet distance at least 0); a
number outside its range in a file `compare` reads was edited or written by something else, and would be
reported as a result. Keys are dotted paths into a file's JSON; ``*`` matches every key of a mapping. Values
that are null or not numbers are left to the report, which writes them as text.
"""

from __future__ import annotations

from collections.abc import Iterator

from cxr_diffusion.whole_number import is_whole_number

UNIT = (0.0, 1.0)           # AUROCs, fractions, precision, recall, coverage
NON_NEGATIVE = (0.0, None)  # distances, ratios, losses, density
SIGNED_UNIT = (-1.0, 1.0)   # differences of AUROCs, cosines, MS-SSIM
DISTANCE = (-1e-6, None)    # Frechet distances: rounding may leave a tiny negative for identical sets

# (dotted key, (lowest, highest), whole number)
EVALUATE = [
    *[(f"closeness.{key}", DISTANCE, False) for key in (
        "domain_fd", "domain_fd_95ci.*", "domain_fd_ratio_to_floor", "untrained_fd_matched", "trained_fd_same_size",
        "inception_fid", "reference_compatible_fid")],
    *[(f"raddino.{key}", UNIT, False) for key in ("precision", "recall", "coverage")],
    ("raddino.fd", DISTANCE, False), ("raddino.density", NON_NEGATIVE, False),
    *[(f"prdc.{key}", UNIT, False) for key in ("precision", "recall", "coverage")],
    ("prdc.density", NON_NEGATIVE, False),
    ("xrv_densenet.fd", DISTANCE, False), ("xrv_densenet.fd_ratio_to_floor", DISTANCE, False),
    ("xrv_densenet.macro_auroc_vs_requested_labels", UNIT, False),
    ("faithfulness.macro_auroc_vs_requested_labels", UNIT, False),
    ("faithfulness.label_agreement.exact_match", UNIT, False),
    ("faithfulness.feature_cosine_to_reference", SIGNED_UNIT, False),
    ("diversity.ms_ssim_same_labels_generated", SIGNED_UNIT, False),
    ("diversity.ms_ssim_same_labels_real", SIGNED_UNIT, False),
    ("memorization.*.fraction_at_or_below_threshold", UNIT, False),
]
TRAINING = [("val.loss", NON_NEGATIVE, False), ("final.steps", NON_NEGATIVE, True)]
UTILITY = [
    ("train_images", NON_NEGATIVE, True), ("test_images", NON_NEGATIVE, True), ("test_patients", NON_NEGATIVE, True),
    ("synthetic_set.steps", (1.0, None), True), ("synthetic_set.guidance_scale", (1.0, None), False),
    ("arms.*.train_images", NON_NEGATIVE, True),
    *[(f"arms.*.macro.{key}", UNIT, False) for key in ("auroc", "ci_low", "ci_high")],
    *[(f"arms.*.per_class.*.{key}", UNIT, False) for key in ("auroc", "ci_low", "ci_high")],
    *[(f"arms.*.vs_real.macro.{key}", SIGNED_UNIT, False) for key in ("difference", "ci_low", "ci_high")],
    *[(f"arms.*.vs_real.per_class.*.{key}", SIGNED_UNIT, False) for key in ("difference", "ci_low", "ci_high")],
    ("arms.*.vs_real.gap_fraction", (float("-inf"), 1.0), False),  # (real - arm) / real: the arm's AUROC is >= 0
    *[(f"arms.*.seeds.{key}", UNIT, False) for key in ("mean", "min", "max")],
    ("arms.*.seeds.sd", NON_NEGATIVE, False), ("arms.*.seeds.count", (1.0, None), True),
    ("arms.*.bootstrap_draws", NON_NEGATIVE, True),
    *[(f"arms.*.subgroups.*.groups.*.{key}", UNIT, False) for key in (
        "macro_auroc", "ci_low", "ci_high", "underdiagnosis", "underdiagnosis_ci_low", "underdiagnosis_ci_high")],
    *[(f"arms.*.subgroups.*.groups.*.{key}", NON_NEGATIVE, True) for key in ("images", "patients", "with_finding")],
    *[(f"arms.*.subgroups.*.{gap}.{key}", SIGNED_UNIT, False)
      for gap in ("auroc_gap", "underdiagnosis_gap") for key in ("gap", "ci_low", "ci_high")],
    *[(f"arms.*.subgroups.*.{gap}.draws", NON_NEGATIVE, True) for gap in ("auroc_gap", "underdiagnosis_gap")],
]
EVALUATOR = [("test_macro_auroc", UNIT, False), ("test_auroc.*", UNIT, False), ("test_images", NON_NEGATIVE, True),
             ("train_images", NON_NEGATIVE, True), ("seconds", NON_NEGATIVE, False)]
REALISM_SCALE = (1.0, 5.0)  # the reader kit's realism answers are whole numbers 1 to 5; a t-interval may pass them
READER_STUDY = [
    *[(key, NON_NEGATIVE, True) for key in ("items", "readers", "files", "agreement.readers", "agreement.items",
                                            "per_reader.*.unanswered")],
    ("agreement.kappa", SIGNED_UNIT, False),
    *[(f"{scope}.{key}", rule, whole) for scope in ("pooled", "per_reader.*") for key, rule, whole in (
        ("answered", NON_NEGATIVE, True), ("real_share", UNIT, False), ("call.correct", NON_NEGATIVE, True),
        ("call.n", NON_NEGATIVE, True), ("call.accuracy", UNIT, False), ("call.ci95.*", UNIT, False),
        ("call.p_value", UNIT, False), ("balanced_accuracy", UNIT, False), ("auc", UNIT, False),
        ("called_real.*.n", NON_NEGATIVE, True), ("called_real.*.fraction", UNIT, False),
        ("realism.*.n", NON_NEGATIVE, True), ("realism.*.mean", REALISM_SCALE, False),
        ("findings.*.*.f1", UNIT, False), ("findings.*.*.positives", NON_NEGATIVE, True))],
]
SAMPLING = [("images", NON_NEGATIVE, True), ("steps", (1.0, None), True), ("images_per_second", NON_NEGATIVE, False),
            ("seconds", NON_NEGATIVE, False), ("guidance_scale", (1.0, None), False), ("count", (1.0, None), True),
            ("seed", NON_NEGATIVE, True)]


def out_of_range(metrics: object, rules: list[tuple[str, tuple[float, float | None], bool]]) -> str | None:
    """The first number of ``metrics`` outside its rule, as ``key is value, expected ...``; None when all fit."""
    for pattern, (low, high), whole in rules:
        for key, value in _values(metrics, pattern.split("."), []):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            inside = value >= low and (high is None or value <= high)
            if not inside or (whole and not is_whole_number(value, 0)):
                kind = "a whole number" if whole else "a number"
                bounds = f"at least {low:g}" if high is None else f"from {low:g} to {high:g}"
                return f"{key} is {value!r}, expected {kind} {bounds}"
    return None


def _values(node: object, parts: list[str], path: list[str]) -> Iterator[tuple[str, object]]:
    if not parts:
        yield ".".join(path), node
        return
    head, rest = parts[0], parts[1:]
    if head == "*" and isinstance(node, list):
        for index, item in enumerate(node):
            yield from _values(item, rest, [*path, str(index)])
        return
    if not isinstance(node, dict):
        return
    if head == "*":
        for key in sorted(node, key=str):
            yield from _values(node[key], rest, [*path, str(key)])
    elif head in node:
        yield from _values(node[head], rest, [*path, head])
