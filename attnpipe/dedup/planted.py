"""Planted near-duplicates for measuring dedup quality: originals from ``make_sample`` plus edited copies.

Each copied original gets one edit (cycling through :data:`EDITS`, or every edit with ``all_edits``): JPEG at low
quality, a rescale, a crop, a brightness change, a blur, a small rotation. Everything else in the sample is a
look-alike (same class: same shape and colour on another textured background), which is what a dedup threshold
must separate copies from. :func:`pair_quality` scores found pairs against the planted truth.

Example::

    truth = make_planted("/tmp/planted", n=240, copied=48)    # folder shards orig/ and copies/
    encode([truth.orig, truth.copies], "/tmp/emb", cfg)
    quality = pair_quality(pairs, truth)                     # precision, recall, per-edit recall
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from attnpipe.data.sample import make_sample


def _jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=15)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _rescale(img: Image.Image) -> Image.Image:
    return img.resize((img.width * 5 // 8, img.height * 5 // 8), Image.Resampling.BICUBIC)


def _crop(img: Image.Image) -> Image.Image:
    w, h = img.size  # keep 85% of each side, off-centre
    return img.crop((w * 10 // 100, h * 5 // 100, w * 95 // 100, h * 90 // 100))


def _brightness(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.3)


def _blur(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=1.5))


def _rotate(img: Image.Image) -> Image.Image:
    return img.rotate(5, resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg_q15": _jpeg,
    "rescale_0.625": _rescale,
    "crop_85": _crop,
    "brightness_1.3": _brightness,
    "blur_1.5": _blur,
    "rotate_5": _rotate,
}


@dataclass
class Planted:
    orig: str  # input directory of the originals (one folder shard ``orig-00000``)
    copies: str  # input directory of the copies (one folder shard ``copies``)
    pairs: list[tuple[str, str, str]] = field(default_factory=list)  # (original id, copy id, edit)

    def family(self) -> dict[str, str]:
        """id -> its original's id, for every original that has copies and every copy."""
        fam = {o: o for o, _, _ in self.pairs}
        fam.update({c: o for o, c, _ in self.pairs})
        return fam


def make_planted(
    out: str,
    n: int = 240,
    copied: int = 48,
    image_size: int = 128,
    seed: int = 0,
    all_edits: bool = False,
    edits: tuple[str, ...] | None = None,
) -> Planted:
    """``n`` originals in ``out/orig`` and edited copies of ``copied`` of them in ``out/copies``.

    With ``all_edits`` every copied original gets every edit, else edits cycle over the copied originals;
    ``edits`` limits them to some names of :data:`EDITS`.
    """
    unknown = sorted(set(edits or ()) - set(EDITS))
    if unknown:
        raise ValueError(f"unknown edits {unknown}; known: {list(EDITS)}")
    if not 0 < copied <= n:
        raise ValueError(f"need 0 < copied <= n, got copied={copied}, n={n}")
    orig = os.path.join(out, "orig")
    make_sample(orig, fmt="folder", n=n, num_shards=1, image_size=image_size, seed=seed, prefix="orig")
    shard = os.path.join(orig, "orig-00000")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(shard) for f in fs if f.endswith(".jpg"))
    picks = np.random.default_rng([seed, 7]).choice(len(files), copied, replace=False)
    names = list(edits or EDITS)
    planted = Planted(orig, os.path.join(out, "copies"))
    for j, i in enumerate(sorted(picks.tolist())):
        path = files[i]
        label, stem = os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
        chosen = names if all_edits else [names[j % len(names)]]
        for edit in chosen:
            folder = os.path.join(planted.copies, label)
            os.makedirs(folder, exist_ok=True)
            with Image.open(path) as im:
                EDITS[edit](im.convert("RGB")).save(os.path.join(folder, f"{stem}-{edit}.jpg"), quality=90)
            planted.pairs.append((f"orig-00000/{label}/{stem}", f"copies/{label}/{stem}-{edit}", edit))
    return planted


def pair_quality(found: Iterable[tuple[str, str]], planted: Planted) -> dict:
    """Pair precision and recall against the planted truth, overall and per edit.

    A found pair is correct when both ids descend from the same original (copies of one original are duplicates of
    each other too). Recall counts planted (original, copy) pairs found directly; ``per_edit[e]`` has the recall
    of edit ``e`` and the precision of found pairs that involve a copy made by ``e``.
    """
    fam = planted.family()
    edit_of = {c: e for _, c, e in planted.pairs}
    got: set[tuple[str, ...]] = {tuple(sorted(p)) for p in found}
    correct = {p for p in got if fam.get(p[0]) is not None and fam.get(p[0]) == fam.get(p[1])}
    truth = {tuple(sorted((o, c))): e for o, c, e in planted.pairs}
    per_edit = {}
    for e in sorted(set(truth.values()), key=list(EDITS).index):
        want = [p for p, pe in truth.items() if pe == e]
        involved = [p for p in got if edit_of.get(p[0]) == e or edit_of.get(p[1]) == e]
        per_edit[e] = {
            "recall": sum(p in got for p in want) / len(want),
            "precision": sum(p in correct for p in involved) / len(involved) if involved else None,
            "planted": len(want),
        }
    return {
        "precision": len(correct) / len(got) if got else 1.0,
        "recall": sum(p in got for p in truth) / len(truth) if truth else 1.0,
        "found": len(got),
        "correct": len(correct),
        "planted": len(truth),
        "per_edit": per_edit,
    }
