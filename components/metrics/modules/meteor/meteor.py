"""METEOR per sample: nltk meteor_score on word_tokenize tokens with WordNet 3.0 synonyms."""
import evaluate

from components.metrics.modules.common import mean
from components.metrics.modules.common import metric_info
from components.metrics.modules.common import prepare
from components.metrics.text import meteor_scores


class Meteor(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__)

    def _compute(self, predictions, references, strip=True, alpha=0.9, beta=3.0, gamma=0.5):
        from nltk.corpus import wordnet

        predictions, references = prepare(predictions, references, strip)
        scores = meteor_scores(predictions, references, alpha=alpha, beta=beta, gamma=gamma)
        settings = {
            "alpha": alpha, "beta": beta, "gamma": gamma, "strip": strip,
            "tokenizer": "nltk.word_tokenize", "wordnet_version": wordnet.get_version(),
        }
        return {"meteor": mean(scores), "per_sample": scores, "settings": settings}
