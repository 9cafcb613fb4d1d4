"""BLEU-1 per sample: unigram BLEU on 13a tokens, no smoothing (evaluate's bleu, max_order=1)."""
import evaluate

from components.metrics.modules.common import mean
from components.metrics.modules.common import metric_info
from components.metrics.modules.common import prepare
from components.metrics.text import bleu_scores


class Bleu1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__)

    def _compute(self, predictions, references, strip=True):
        predictions, references = prepare(predictions, references, strip)
        scores = bleu_scores(predictions, references, max_order=1, tokenize="13a")
        settings = {"max_order": 1, "tokenize": "13a", "smooth": False, "strip": strip}
        return {"bleu1": mean(scores), "per_sample": scores, "settings": settings}
