"""ROUGE-1 F-measure per sample on rouge_score's default tokenizer, no stemming."""
import evaluate

from components.metrics.modules.common import mean
from components.metrics.modules.common import metric_info
from components.metrics.modules.common import prepare
from components.metrics.text import rouge1_scores


class Rouge1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__)

    def _compute(self, predictions, references, strip=True, use_stemmer=False):
        predictions, references = prepare(predictions, references, strip)
        scores = rouge1_scores(predictions, references, use_stemmer=use_stemmer)
        settings = {"use_stemmer": use_stemmer, "tokenizer": "rouge_score default", "strip": strip}
        return {"rouge1": mean(scores), "per_sample": scores, "settings": settings}
