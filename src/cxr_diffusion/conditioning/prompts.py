"""Prompts from NIH "Finding Labels": ``Effusion|Infiltration`` -> "chest x-ray showing effusion and infiltration"."""

from __future__ import annotations

from cxr_diffusion.config import ClipConfig
from cxr_diffusion.nih_labels import NO_FINDING
from cxr_diffusion.data.nih import DataError, split_labels


def finding_phrase(labels: tuple[str, ...]) -> str:
    """``('Effusion', 'Pleural_Thickening', 'Mass')`` -> "effusion, pleural thickening and mass"."""
    words = [label.replace("_", " ").lower() for label in labels]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def prompt_for(finding_labels: str, config: ClipConfig) -> str:
    """The prompt for one image's Finding Labels (label order as given; NIH lists them alphabetically)."""
    labels = split_labels(finding_labels)
    if not labels:
        raise DataError(f"empty Finding Labels {finding_labels!r}: cannot build a prompt")
    findings = tuple(label for label in labels if label != NO_FINDING)
    if not findings:
        return config.normal_prompt
    prompt = config.prompt_template.format(findings=finding_phrase(findings)).strip()
    if not prompt:
        raise DataError(f"clip.prompt_template gives an empty prompt for {finding_labels!r}")
    return prompt


def prompts_cut_alike(tokenizer, prompts: list[str], max_length: int) -> tuple[tuple[str, str], int] | None:
    """The first two different prompts that ``tokenizer`` encodes as the same first ``max_length`` tokens (cut
    there, or alike as a whole: CLIP's tokenizer lowercases and collapses spaces), and the longest prompt's length
    in tokens; None when every prompt keeps tokens of its own (a text encoder would otherwise give two findings
    one condition)."""
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
    seen: dict[tuple[int, ...], str] = {}
    for prompt, ids in zip(prompts, tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]):
        other = seen.setdefault(tuple(ids), prompt)
        if other != prompt:
            return (other, prompt), max(lengths)
    return None
