"""Caption metrics through pycocoevalcap (the COCO caption toolkit), with the Java parts detected, not assumed.

Which metric needs what:

| metric | pure Python | needs Java |
|---|---|---|
| BLEU-1..4 (``Bleu_1``..``Bleu_4``), ROUGE-L (``ROUGE_L``), CIDEr-D (``CIDEr``) | yes | no |
| METEOR (``METEOR``) | no | yes (meteor-1.5.jar, ships with pycocoevalcap; ~20 s start-up) |
| SPICE (``SPICE``) | no | yes, plus Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use |
| PTB tokenisation (the official pre-processing) | no | yes (stanford-corenlp-3.4.1.jar, ships with pycocoevalcap) |

Without Java the captions are tokenised by :func:`simple_ptb_tokenize` (a Python approximation of the PTB rules:
lower case, clitics split, punctuation removed; scores can differ from the official ones in the last digits), and
METEOR / SPICE are skipped with a message. pycocoevalcap's ``CIDEr`` is CIDEr-D (clipped counts, length penalty
sigma 6, x10): identical candidate and reference give 10.0 as long as the corpus has more than one image (a single
image has zero IDF for every n-gram and scores 0).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PURE_PYTHON_METRICS = ("BLEU", "ROUGE_L", "CIDEr")
JAVA_METRICS = ("METEOR", "SPICE")
DEFAULT_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
ALL_METRICS = PURE_PYTHON_METRICS + JAVA_METRICS

_SPECIAL = re.compile(r"<\|[^|<>]*\|>")
_EMPTY_GROUP = re.compile(r"\(\s*(?:,\s*)*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
# punctuation tokens that the official PTB step removes (pycocoevalcap's PUNCTUATIONS, in PTB spelling or raw)
_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", "(", ")", "{", "}", "[", "]", "-lsb-", "-rsb-",
          ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|[a-z0-9]+(?:[.\-/&][a-z0-9]+)*|\S")


def strip_object_refs(text: str) -> str:
    """Caption text without object references: ``A man (<|Obj_0|>) rides ...`` / ``A man (<|VRT_3|>...) rides``
    -> ``A man rides ...``. Removes every ``<|...|>`` token (VRTs, placeholders, ``<|im_end|>``), the parentheses
    left empty, and spaces before punctuation."""
    text = _SPECIAL.sub("", text)
    text = _EMPTY_GROUP.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return " ".join(text.split())


def simple_ptb_tokenize(text: str) -> str:
    """Python stand-in for the PTB tokenizer + punctuation removal: lower-cased, space-joined tokens."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    tokens = _TOKEN.findall(text)
    return " ".join(t for t in tokens if t not in _PUNCT)


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True if a working `java` is on PATH (`java -version` exits 0 within 30 s)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], check=False, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _spice_models_present() -> bool:
    import pycocoevalcap.spice as spice_pkg

    return any((Path(spice_pkg.__file__).parent / "lib").glob("stanford-corenlp-3.6.0*.jar"))


@dataclass
class CaptionScores:
    """Corpus scores by metric name (``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``), the
    tokenizer used ("ptb-java" or "python"), and the metrics skipped with the reason."""

    scores: dict[str, float] = field(default_factory=dict)
    tokenizer: str = "python"
    skipped: dict[str, str] = field(default_factory=dict)


def _tokenize(captions: Mapping[Hashable, Sequence[str]], use_java: bool) -> dict[Hashable, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
        if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
            raise RuntimeError("the Java PTB tokenizer returned a different number of captions than it was given; "
                               "rerun with tokenizer='python'")
        return out
    return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}


def caption_scores(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "auto",
) -> CaptionScores:
    """Corpus-level caption metrics of one candidate per key against its references.

    Args:
        references: key -> list of reference captions (at least one each).
        candidates: key -> the candidate caption ("" allowed); must have exactly the keys of `references`.
        metrics: names from ``ALL_METRICS`` ("BLEU" gives Bleu_1..Bleu_4).
        tokenizer: "auto" (PTB via Java when available, else Python), "ptb" (require Java), "python".
    """
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {ALL_METRICS}")
    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")
    if set(references) != set(candidates):
        missing, extra = set(references) - set(candidates), set(candidates) - set(references)
        raise ValueError(f"candidates and references must have the same keys: {len(missing)} reference key(s) "
                         f"without a candidate, {len(extra)} candidate key(s) without references")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} key(s) have no reference caption, e.g. {empty[:3]}")
    java = java_available()
    if tokenizer == "ptb" and not java:
        raise RuntimeError("tokenizer='ptb' needs Java (the Stanford PTB tokenizer jar); install a JRE or use 'auto'")
    use_java_tok = java and tokenizer != "python"
    result = CaptionScores(tokenizer="ptb-java" if use_java_tok else "python")
    if not references:
        return result
    gts = _tokenize(references, use_java_tok)
    res = _tokenize({k: [candidates[k]] for k in references}, use_java_tok)
    for name in metrics:
        if name in JAVA_METRICS and not java:
            result.skipped[name] = f"{name} needs Java, which was not found (install a JRE, e.g. openjdk-17-jre)"
            continue
        if name == "SPICE" and not _spice_models_present():
            result.skipped[name] = ("SPICE needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib, which it "
                                    "downloads on first use (run pycocoevalcap's get_stanford_models once online)")
            continue
        result.scores.update(_score(name, gts, res))
    return result


def _score(name: str, gts: dict, res: dict) -> dict[str, float]:
    if name == "BLEU":
        from pycocoevalcap.bleu.bleu import Bleu

        score, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return {f"Bleu_{i + 1}": float(s) for i, s in enumerate(score)}
    if name == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge

        return {"ROUGE_L": float(Rouge().compute_score(gts, res)[0])}
    if name == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return {"CIDEr": float(Cider().compute_score(gts, res)[0])}
    if name == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # a Java subprocess, stopped by Meteor.__del__
        return {"METEOR": float(meteor.compute_score(gts, res)[0])}
    from pycocoevalcap.spice.spice import Spice

    return {"SPICE": float(Spice().compute_score(gts, res)[0])}
