"""Prompts from NIH "Finding Labels": ``Effusion|Infiltration`` -> "chest x-ray showing effusion and infiltration"."""

from __future__ import annotations

from collections.abc import Iterable

from cxr_diffusion.config import ClipConfig, ParamsError
from cxr_diffusion.nih_labels import NO_FINDING
from cxr_diffusion.data.nih import DataError, split_labels
from cxr_diffusion.safe_text import visible_text


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


def check_one_prompt_per_finding(finding_labels: Iterable[str], prompts: Iterable[str]) -> None:
    """Films of different findings (``Finding Labels`` as sets: order and repeats do not change a finding) must
    get different prompts: clip.normal_prompt written as a finding's prompt would give No Finding and that finding
    one condition."""
    findings_of: dict[str, tuple[str, ...]] = {}
    for labels, prompt in zip(finding_labels, prompts):
        findings = tuple(sorted(set(split_labels(labels))))
        other = findings_of.setdefault(prompt, findings)
        if other != findings:
            raise ParamsError(f"params: films of {'|'.join(other)} and of {'|'.join(findings)} get the same prompt "
                              f"{visible_text(repr(prompt), 160)}; change clip.normal_prompt or clip.prompt_template "
                              f"so that each finding has a prompt of its own")
