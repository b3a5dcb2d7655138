"""Phantom metadata: real NIH rows, sampled reproducibly a whole patient at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr_diffusion.data.nih import NIH_HEADER, DataError, patient_sort_key, read_metadata_csv


def sample_phantom_metadata(source_csv: str | Path, n_images: int, seed: int) -> pd.DataFrame:
    """Exactly ``n_images`` rows of the real metadata, with every follow-up of each sampled patient.

    Patients are visited in a seeded random order; a patient whose studies would overshoot the
    target is skipped, so the result has exactly ``n_images`` rows whenever the source allows it.
    """
    metadata = read_metadata_csv(source_csv)
    if n_images > len(metadata):
        raise DataError(f"params: 'dataset.phantom.n_images' is {n_images}, more than the {len(metadata)} rows of "
                        f"{source_csv}; lower it")
    studies_per_patient = metadata.groupby("Patient ID").size()  # ids are text: visit them in NIH's numeric order
    studies_per_patient = studies_per_patient.loc[sorted(studies_per_patient.index, key=patient_sort_key)]
    order = np.random.default_rng(seed).permutation(studies_per_patient.index.to_numpy())
    chosen, total = [], 0
    for patient in order:
        count = int(studies_per_patient[patient])
        if total + count <= n_images:
            chosen.append(patient)
            total += count
        if total == n_images:
            break
    sample = metadata[metadata["Patient ID"].isin(set(chosen))]
    sample = sample.sort_values(["Patient ID", "Follow-up #"], key=lambda column: column.map(patient_sort_key)
                                if column.name == "Patient ID" else column).reset_index(drop=True)
    return sample[[c for c in NIH_HEADER if c in sample.columns]]
