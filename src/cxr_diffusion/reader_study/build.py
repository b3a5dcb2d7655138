"""The reader-study kit of a pipeline run: real test images and every branch's generations (stage ``reader_study``)."""

from __future__ import annotations

from pathlib import Path

from cxr_diffusion.config import Params
from cxr_diffusion.data.shards import PreparedImages, check_generated_by, check_prepared_for
from cxr_diffusion.reader_study.items import select_items, source_counts
from cxr_diffusion.reader_study.kit import build_kit
from cxr_diffusion.reader_study.labels import study_findings


def build_study_kit(params: Params, prepared_dir: Path, samples_dir: Path, kit_dir: Path, key_path: Path,
                    archive_path: Path | None = None) -> dict:
    """The kit (``kit_dir``, and as a zip at ``archive_path``) and its answer key (``key_path``) from the prepared
    test split and each branch's samples (``samples_dir/<branch>``), as ``params.reader_study`` sets them; returns
    the kit's summary. The pipeline's seed picks the images; their order and ids come from a secret study key."""
    config = params.reader_study
    check_prepared_for(prepared_dir, params.image_size, params.filter.classes)  # the findings the key names
    real = PreparedImages(prepared_dir, "test", channels=1)
    for branch in params.branches:  # generations of its branch at the real films' size: never told apart by either
        check_generated_by(Path(samples_dir) / branch, branch, params.image_size)
    generated = {branch: PreparedImages(Path(samples_dir) / branch, "test", channels=1) for branch in params.branches}
    counts = source_counts(list(generated), config.count, config.real_fraction)
    print(f"reader_study: {config.count} items ({', '.join(f'{n} {source}' for source, n in counts.items())}), "
          f"{config.calibration} of them for calibration", flush=True)
    items = select_items(real, generated, config.count, config.real_fraction, params.seed)
    summary = build_kit(items, kit_dir, key_path, config.study_id, study_findings(real.classes), config.calibration,
                        config.display_size, archive_path=archive_path)
    return {**summary, "sources": counts}
