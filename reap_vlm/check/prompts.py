"""Prompts for checking a pruned model: drawn from the user's calibration file, or a built-in set.

Half the prompts carry an image (grounding prompts when the item has ``regions``), half are
text-only, when the source has both.  The built-in set needs no files: text prompts in English
and Turkish (the user's languages) plus pictures of coloured shapes drawn here, asked about with
the same grounding templates the calibration loader uses.
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..calibration.files import GROUNDING_TEMPLATES, CalibrationSample, load_calibration
from ..checkpoint.fsutil import read_json
from ..errors import ReapError
from ..metadata import METADATA_NAME
from ..settings import Settings
from .shapes import draw_shapes

BUILTIN_TEXT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Explain what a bounding box is in computer vision.",
    "List three colours and one object of each colour.",
    "Write a short sentence about the sea.",
    "What is 12 + 30?",
    "Resimde ne var? Kisaca anlat.",
    "Bir sinirlayici kutu nedir?",
    "Translate to English: Kirmizi kare solda.",
)


@dataclass
class EvalPrompt:
    """One prompt of the check: where it came from and what it asks."""

    id: str  # "calibration:12" (item 12 of the file) or "builtin:text-0"
    sample: CalibrationSample
    also_calibration: bool = False  # the item was one of the samples the experts were scored on

    @property
    def kind(self) -> str:
        if self.sample.regions:
            return "grounding"
        return "image+text" if self.sample.has_image else "text"

    @property
    def question(self) -> str:
        """The last user text, for the report."""
        if self.sample.text is not None:
            return self.sample.text
        for message in reversed(self.sample.messages or []):
            content = message["content"]
            if isinstance(content, str):
                return content
            texts = [p["text"] for p in content if p.get("type") == "text"]
            if texts:
                return " ".join(texts)
        return ""


def _interleave(with_image: list, text_only: list, count: int) -> list:
    """Alternate image and text prompts (image first) until ``count``; one side running out is filled
    from the other."""
    chosen = []
    while len(chosen) < count and (with_image or text_only):
        for group in (with_image, text_only):
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    return chosen


def calibration_prompts(path: Path, count: int, seed: int, scored: Collection[int] = (),
                        images: bool = True) -> tuple[list[EvalPrompt], list[str]]:
    """``count`` items of the calibration file drawn with ``seed``, half with images; bad items are
    skipped (their reasons returned), as a check should not stop on one broken calibration line.

    ``scored`` are the indices of items the experts were scored on: prompts are drawn from the other
    items first, and only when too few remain are scored ones added (marked ``also_calibration``).
    ``images=False`` (a text-only model): items with images are left out."""
    calib = load_calibration(path, max_samples=10**9, seed=seed, skip_bad=True)
    rng = random.Random(f"eval:{seed}")
    scored = set(scored)
    usable = [s for s in calib.samples if images or not s.has_image]
    held_out = [s for s in usable if s.index not in scored]
    used = [s for s in usable if s.index in scored]
    groups = []
    for samples in (held_out, used):
        with_image = [s for s in samples if s.has_image]
        text_only = [s for s in samples if not s.has_image]
        rng.shuffle(with_image)
        rng.shuffle(text_only)
        groups.append((with_image, text_only))
    chosen = _interleave(*groups[0], count)
    fill = _interleave(*groups[1], count - len(chosen))
    prompts = [EvalPrompt(f"calibration:{s.index}", s) for s in chosen]
    prompts += [EvalPrompt(f"calibration:{s.index}", s, also_calibration=True) for s in fill]
    return prompts, calib.skipped


def builtin_prompts(count: int, seed: int, image_dir: Path, images: bool = True) -> list[EvalPrompt]:
    """Built-in prompts: text prompts and grounding questions about shapes drawn into ``image_dir`` (text
    prompts only when ``images`` is False: a text-only model)."""
    rng = random.Random(f"builtin:{seed}")
    n_images = (count + 1) // 2 if images else 0
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    with_image = []
    for i in range(n_images):
        image, (region,) = draw_shapes(rng, rng.choice(((256, 256), (320, 240), (240, 320))), count=1,
                                       background=(245, 245, 240))
        path = image_dir / f"builtin-{i}.png"
        image.save(path)
        question = rng.choice(GROUNDING_TEMPLATES).format(region=region)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        sample = CalibrationSample(i, "grounding", messages=messages, images=[path], regions=[region])
        with_image.append(EvalPrompt(f"builtin:image-{i}", sample))
    texts = list(BUILTIN_TEXT_PROMPTS)
    rng.shuffle(texts)
    text_only = [EvalPrompt(f"builtin:text-{i}", CalibrationSample(i, "prompt", messages=[
        {"role": "user", "content": texts[i % len(texts)]}])) for i in range(count - n_images)]
    return _interleave(with_image, text_only, count)


# ----------------------------------------------------------------------------------------------- choosing

PROMPT_IMAGE_DIR = "prompt-images"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not here: compare the paths
        return Path(a).resolve() == Path(b).resolve()


def scored_calibration(pruned_path: Path | None, calibration: Path) -> tuple[set[int] | None, str | None]:
    """Which items of ``calibration`` the experts were scored on, from the pruned folder's reap_metadata.json
    (copied there by prune_model.py): a set (empty when reap.py read another file), or None with the reason
    when that cannot be told."""
    path = None if pruned_path is None else Path(pruned_path) / METADATA_NAME
    if path is None or not path.is_file():
        return None, (f"the pruned folder has no {METADATA_NAME}, so whether prompts from {calibration} were "
                      "among the scored calibration samples is unknown")
    try:
        raw = read_json(path, METADATA_NAME)
    except ReapError as exc:
        return None, f"{exc}; whether the prompts were among the scored calibration samples is unknown"
    recorded = raw.get("calibration_path") if isinstance(raw, dict) else None
    if not recorded:
        return None, (f"{METADATA_NAME} does not name the calibration file it was scored on; prompts from "
                      f"{calibration} may repeat scored samples")
    if not _same_file(Path(recorded), Path(calibration)):
        return set(), None
    samples = raw.get("calibration_samples")
    if not isinstance(samples, list) or not all(isinstance(i, int) for i in samples):
        return None, (f"{calibration} is the file the experts were scored on, and {METADATA_NAME} does not list "
                      "which of its items were used (calibration_samples; rerun reap.py to record it): prompts may "
                      "repeat scored samples")
    return {int(i) for i in samples}, None


def choose_prompts(settings: Settings, output: Path, notes: list[str],
                   pruned_path: Path | None = None, images: bool = True) -> tuple[list[EvalPrompt], str]:
    """The prompts of the check and a phrase saying where they came from.  Prompts from --calibration
    avoid the items the experts were scored on (named in the pruned folder's reap_metadata.json); when too
    few others remain, scored ones fill in, marked ``also_calibration`` and said so in ``notes``."""
    if settings.calibration_path is not None:
        calibration = settings.calibration_path
        scored, unknown = scored_calibration(pruned_path, calibration)
        prompts, skipped = calibration_prompts(calibration, settings.num_prompts, settings.seed, scored or (), images)
        if skipped:
            notes.append(f"{len(skipped)} calibration items skipped (e.g. {skipped[0]})")
        source = f"{len(prompts)} drawn from {calibration} (seed {settings.seed})"
        overlap = sum(1 for p in prompts if p.also_calibration)
        if unknown:
            notes.append(unknown)
            source += ", held out from scoring: unknown"
        elif scored:
            source += f", avoiding the {len(scored)} items scored by reap.py"
            if overlap:
                notes.append(f"{overlap} of {len(prompts)} prompts were also calibration samples: {calibration} has "
                             f"only {len(prompts) - overlap} usable items reap.py did not score; for a held-out "
                             "check, pass a --calibration file (or more items) the experts were not scored on")
                source += f" ({overlap} of {len(prompts)} also calibration samples)"
        else:
            source += ", not the file the experts were scored on"
    else:
        prompts = builtin_prompts(settings.num_prompts, settings.seed, output / PROMPT_IMAGE_DIR, images)
        source = f"{len(prompts)} built-in (text" + (f", and shapes drawn into {PROMPT_IMAGE_DIR}/)" if images else ")")
    return prompts, source
