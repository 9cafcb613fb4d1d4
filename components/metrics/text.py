"""Text metrics per sample, as the papers' evaluation scripts compute them.

M3D, Med3DVLM (and E3D-GPT, Med-2E3, which follow them) strip each generated text and
reference, then call ``evaluate``'s ``bleu`` (``max_order=1``), ``rouge``
(``rouge_types=["rouge1"]``), ``meteor`` and ``bertscore`` (``lang="en"``) once per
sample and average the per-sample values. Per sample that is:

* BLEU-1: clipped unigram precision times the brevity penalty on ``13a`` tokens, no
  smoothing (tensorflow/nmt ``compute_bleu``, which evaluate's ``bleu`` wraps); 0 for an
  empty prediction or reference.
* ROUGE-1: F-measure of unigram overlap on rouge_score's default tokens (lower-cased,
  non-alphanumerics dropped, no stemming).
* METEOR: ``nltk.translate.meteor_score.single_meteor_score`` on ``word_tokenize`` tokens
  with alpha 0.9, beta 3, gamma 0.5, Porter stemming and WordNet 3.0 synonyms.
* BERTScore F1: see :mod:`components.metrics.bertscore`.

:class:`TextMetricSuite` computes all four for whole lists: each distinct text is
tokenised once and nltk's stemmer and WordNet lookups are memoised (both are pure
functions of the word), so the values are the reference implementations' and the work
scales with the vocabulary rather than the number of pairs.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Sequence

from .bertscore import BertScoreSettings, bertscore_for

__all__ = [
    "METRIC_NAMES",
    "TextMetricSettings",
    "TextMetricResult",
    "TextMetricSuite",
    "bleu_scores",
    "rouge1_scores",
    "meteor_scores",
    "bertscore_f1_scores",
    "as_single_references",
]

METRIC_NAMES = ("bleu1", "rouge1", "meteor", "bertscore_f1")


@dataclass(frozen=True)
class TextMetricSettings:
    """Which text metrics are computed and how; recorded with every result."""

    metrics: tuple[str, ...] = METRIC_NAMES
    """Subset of ``bleu1``, ``rouge1``, ``meteor``, ``bertscore_f1``."""
    strip: bool = True
    """Strip surrounding whitespace from predictions and references first (as the papers' scripts do)."""
    bleu_tokenize: str = "13a"
    """sacrebleu tokenizer name (evaluate's ``bleu`` uses 13a)."""
    meteor_alpha: float = 0.9
    meteor_beta: float = 3.0
    meteor_gamma: float = 0.5
    rouge_use_stemmer: bool = False
    bertscore: BertScoreSettings = field(default_factory=BertScoreSettings)

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(METRIC_NAMES)
        if unknown:
            raise ValueError(f"unknown text metrics {sorted(unknown)}; choose from {METRIC_NAMES}")


@dataclass
class TextMetricResult:
    """Per-sample values and their means (``mean`` over all samples, 0.0 when empty)."""

    per_sample: dict[str, list[float]]
    mean: dict[str, float]
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    for name, texts in (("prediction", predictions), ("reference", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name} {i} is {type(text).__name__}, not str")
    return predictions, references


# ---- BLEU -------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _bleu_tokenizer(name: str):
    from sacrebleu.tokenizers import tokenizer_13a, tokenizer_none

    tokenizers = {"13a": tokenizer_13a.Tokenizer13a, "none": tokenizer_none.NoneTokenizer}
    if name not in tokenizers:
        raise ValueError(f"BLEU tokenize={name!r}: supported {sorted(tokenizers)}")
    return tokenizers[name]()


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    counts: Counter = Counter()
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            counts[tuple(tokens[i:i + order])] += 1
    return counts


def _sentence_bleu(hyp: list[str], ref: list[str], hyp_counts: Counter, ref_counts: Counter, max_order: int) -> float:
    matches = [0] * max_order
    for ngram, count in (hyp_counts & ref_counts).items():
        matches[len(ngram) - 1] += count
    precisions = []
    for order in range(1, max_order + 1):
        possible = len(hyp) - order + 1
        precisions.append(matches[order - 1] / possible if possible > 0 else 0.0)
    geo_mean = math.exp(sum((1.0 / max_order) * math.log(p) for p in precisions)) if min(precisions) > 0 else 0.0
    if not ref or not hyp:
        return 0.0
    ratio = len(hyp) / len(ref)
    brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * brevity_penalty


def bleu_scores(predictions: Sequence[str], references: Sequence[str], max_order: int = 1,
                tokenize: str = "13a") -> list[float]:
    """Sentence BLEU per pair (one reference each), no smoothing."""
    predictions, references = _check_pairs(predictions, references)
    tokenizer = _bleu_tokenizer(tokenize)
    tokens = {text: tokenizer(text).split() for text in set(predictions) | set(references)}
    counts = {text: _ngrams(toks, max_order) for text, toks in tokens.items()}
    return [
        _sentence_bleu(tokens[p], tokens[r], counts[p], counts[r], max_order)
        for p, r in zip(predictions, references)
    ]


# ---- ROUGE-1 ----------------------------------------------------------------------------

def rouge1_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> list[float]:
    """ROUGE-1 F-measure per pair on rouge_score's default tokenizer."""
    from rouge_score import scoring, tokenizers

    predictions, references = _check_pairs(predictions, references)
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=use_stemmer)
    counts = {text: Counter(tokenizer.tokenize(text)) for text in set(predictions) | set(references)}
    scores = []
    for p, r in zip(predictions, references):
        pred, target = counts[p], counts[r]
        overlap = sum(min(n, pred[w]) for w, n in target.items())
        precision = overlap / max(sum(pred.values()), 1)
        recall = overlap / max(sum(target.values()), 1)
        scores.append(scoring.fmeasure(precision, recall))
    return scores


# ---- METEOR -----------------------------------------------------------------------------

class _MemoStemmer:
    """PorterStemmer.stem, memoised."""

    def __init__(self) -> None:
        from nltk.stem.porter import PorterStemmer

        self._stem = PorterStemmer().stem
        self._cache: dict[str, str] = {}

    def stem(self, word: str) -> str:
        stem = self._cache.get(word)
        if stem is None:
            stem = self._cache[word] = self._stem(word)
        return stem


class _MemoWordNet:
    """The one WordNet call METEOR makes, ``synsets(word)``, memoised."""

    def __init__(self) -> None:
        from nltk.corpus import wordnet

        self._wordnet = wordnet
        self._cache: dict[str, list] = {}

    def synsets(self, word: str) -> list:
        synsets = self._cache.get(word)
        if synsets is None:
            synsets = self._cache[word] = self._wordnet.synsets(word)
        return synsets


@lru_cache(maxsize=1)
def _meteor_helpers() -> tuple[_MemoStemmer, _MemoWordNet]:
    from .language_data import require_language_data

    require_language_data()
    return _MemoStemmer(), _MemoWordNet()


def meteor_scores(predictions: Sequence[str], references: Sequence[str], alpha: float = 0.9,
                  beta: float = 3.0, gamma: float = 0.5) -> list[float]:
    """nltk METEOR per pair on ``word_tokenize`` tokens (WordNet 3.0 synonyms)."""
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import single_meteor_score

    predictions, references = _check_pairs(predictions, references)
    stemmer, wordnet = _meteor_helpers()
    tokens = {text: word_tokenize(text) for text in set(predictions) | set(references)}
    return [
        single_meteor_score(tokens[r], tokens[p], stemmer=stemmer, wordnet=wordnet,
                            alpha=alpha, beta=beta, gamma=gamma)
        for p, r in zip(predictions, references)
    ]


# ---- BERTScore --------------------------------------------------------------------------

def bertscore_f1_scores(predictions: Sequence[str], references: Sequence[str],
                        settings: BertScoreSettings = BertScoreSettings()) -> list[float]:
    """BERTScore F1 per pair (per-pair greedy matching, batched embeddings)."""
    predictions, references = _check_pairs(predictions, references)
    return bertscore_for(settings).score(predictions, references)["f1"]


# ---- suite ------------------------------------------------------------------------------

def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("nltk", "rouge_score", "sacrebleu", "bert_score", "transformers", "torch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "missing"
    return versions


class TextMetricSuite:
    """All text metrics over lists of predictions and references, with settings recorded."""

    def __init__(self, settings: TextMetricSettings = TextMetricSettings()):
        self.settings = settings
        if "meteor" in settings.metrics:
            _meteor_helpers()  # fail now, with the install command, not after generation

    def describe(self) -> dict:
        """Every setting that determines the values, for the results JSON."""
        described = asdict(self.settings)
        described["metrics"] = list(self.settings.metrics)
        if "bertscore_f1" in self.settings.metrics:
            described["bertscore"] = bertscore_for(self.settings.bertscore).describe()
        if "meteor" in self.settings.metrics:
            from nltk.corpus import wordnet

            described["meteor_wordnet_version"] = wordnet.get_version()
            described["meteor_tokenizer"] = "nltk.word_tokenize (punkt_tab english)"
        described["rouge_tokenizer"] = "rouge_score.tokenizers.DefaultTokenizer"
        described["library_versions"] = _library_versions()
        return described

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> TextMetricResult:
        """Per-sample lists and means for every configured metric."""
        s = self.settings
        predictions, references = _check_pairs(predictions, references)
        if s.strip:
            predictions = [p.strip() for p in predictions]
            references = [r.strip() for r in references]
        compute = {
            "bleu1": lambda: bleu_scores(predictions, references, 1, s.bleu_tokenize),
            "rouge1": lambda: rouge1_scores(predictions, references, s.rouge_use_stemmer),
            "meteor": lambda: meteor_scores(predictions, references, s.meteor_alpha, s.meteor_beta, s.meteor_gamma),
            "bertscore_f1": lambda: bertscore_f1_scores(predictions, references, s.bertscore),
        }
        per_sample = {name: compute[name]() for name in s.metrics}
        mean = {name: (sum(v) / len(v) if v else 0.0) for name, v in per_sample.items()}
        return TextMetricResult(per_sample=per_sample, mean=mean, settings=self.describe())


def as_single_references(references: Sequence) -> list[str]:
    """References as one string per sample; also accepts ``[[ref], ...]`` as the papers' scripts pass them."""
    single = []
    for i, ref in enumerate(references):
        if isinstance(ref, str):
            single.append(ref)
        elif len(ref) == 1 and isinstance(ref[0], str):
            single.append(ref[0])
        else:
            raise ValueError(f"reference {i}: exactly one reference string per sample is supported, got {ref!r}")
    return single
