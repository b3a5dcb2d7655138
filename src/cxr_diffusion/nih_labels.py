"""NIH ChestX-ray14's vocabulary: the 14 findings of its "Finding Labels" and the label of a normal study."""

from __future__ import annotations

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"
NIH_LABELS: tuple[str, ...] = NIH_FINDINGS + (NO_FINDING,)
