"""BERTScore per sample (F1 as the papers report it; precision and recall too)."""
import evaluate

from components.metrics.bertscore import PACKAGED_MINILM
from components.metrics.bertscore import BertScoreSettings
from components.metrics.bertscore import bertscore_for
from components.metrics.modules.common import mean
from components.metrics.modules.common import metric_info
from components.metrics.modules.common import prepare


class BertScoreF1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__)

    def _compute(self, predictions, references, strip=True, model=PACKAGED_MINILM, num_layers=None,
                 idf=False, rescale_with_baseline=False, batch_size=32, device="cpu"):
        predictions, references = prepare(predictions, references, strip)
        settings = BertScoreSettings(model=model, num_layers=num_layers, idf=idf,
                                     rescale_with_baseline=rescale_with_baseline,
                                     batch_size=batch_size, device=device)
        scorer = bertscore_for(settings)
        scores = scorer.score(predictions, references)
        return {
            "bertscore_f1": mean(scores["f1"]),
            "per_sample": scores["f1"],
            "precision": scores["precision"],
            "recall": scores["recall"],
            "settings": {**scorer.describe(), "strip": strip},
        }
