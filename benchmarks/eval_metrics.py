"""Text-metric suite vs the reference implementations called one pair at a time.

    python benchmarks/eval_metrics.py [--pairs 2000] [--seed 0]

Synthetic report-like and VQA-like text pairs (fixed seed) are scored twice: by
``TextMetricSuite`` over the whole list, and pair by pair with sacrebleu (BLEU, max order
1, no smoothing), rouge_score, nltk ``meteor_score`` and bert_score with the same model and
layer. Models and WordNet are loaded before timing; the suite starts with empty memo
caches. Prints both times, their ratio and the largest absolute difference per metric.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FINDINGS = [
    "No focal lesion is seen in the {organ}.",
    "A {size} cm hypodense nodule in the {side} {organ}.",
    "{Organ} is normal in size and attenuation.",
    "Small {side} pleural effusion without pneumothorax.",
    "Calcified plaques in the {vessel}, mild cardiomegaly.",
    "Multiple {abnormality} lesions, the largest {size} cm.",
    "There is {abnormality} involving the {side} {organ}.",
    "No lymphadenopathy; the {vessel} is of normal calibre.",
    "Post-operative changes of the {organ} with {abnormality}.",
    "{Organ} {abnormality}, measuring {size} x {size} cm.",
]
ORGANS = ["liver", "spleen", "pancreas", "kidney", "lung", "gallbladder", "stomach", "adrenal gland", "bladder"]
VESSELS = ["aorta", "portal vein", "inferior vena cava", "pulmonary artery"]
ABNORMALITIES = ["cystic", "metastatic", "calcified", "necrotic", "fatty infiltration", "hemorrhage", "atelectasis", "mass"]
SHORT_ANSWERS = ["Axial", "Coronal", "Sagittal", "Non-contrast", "Arterial phase", "Portal venous phase", "Liver",
                 "Right kidney", "Left lung upper lobe", "Cyst", "Hepatocellular carcinoma", "Pleural effusion",
                 "Segment VII of the liver", "Pancreatic head", "Mass lesion"]


def _sentence(rng: random.Random) -> str:
    organ = rng.choice(ORGANS)
    return rng.choice(FINDINGS).format(
        organ=organ, Organ=organ.capitalize(), side=rng.choice(["left", "right"]), vessel=rng.choice(VESSELS),
        abnormality=rng.choice(ABNORMALITIES), size=f"{rng.uniform(0.3, 9.9):.1f}")


def _perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    out = []
    for word in words:
        roll = rng.random()
        if roll < 0.1:
            continue
        if roll < 0.2:
            out.append(rng.choice(ORGANS + ABNORMALITIES))
        elif roll < 0.25:
            out += [word, word]
        else:
            out.append(word)
    return " ".join(out)


def synthetic_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """(predictions, references): 40 % reports of 1-4 findings, 60 % short VQA answers."""
    rng = random.Random(seed)
    predictions, references = [], []
    for _ in range(n):
        if rng.random() < 0.4:
            reference = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
            prediction = rng.choice([_perturb(reference, rng), " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))])
        else:
            reference = rng.choice(SHORT_ANSWERS)
            prediction = rng.choice([reference, rng.choice(SHORT_ANSWERS), f"The answer is {reference.lower()}."])
        if rng.random() < 0.01:
            prediction = ""
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


class ReferenceScorers:
    """The reference implementations, each called once per pair."""

    def __init__(self, bertscore_model_path: str, num_layers: int):
        from bert_score import BERTScorer
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import BLEU

        from components.metrics.bertscore import _patch_empty_sentence_encoding

        # nmt compute_bleu (evaluate's bleu) has no effective order; sacrebleu warns about that.
        logging.getLogger("sacrebleu").setLevel(logging.ERROR)
        self.bleu = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=False)
        self.rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
        self.bert = BERTScorer(model_type=bertscore_model_path, num_layers=num_layers)
        # bert_score encodes "" through an API transformers 5 removed; same special-token ids.
        _patch_empty_sentence_encoding(self.bert._tokenizer)

    def score(self, name: str, prediction: str, reference: str) -> float:
        from nltk.tokenize import word_tokenize
        from nltk.translate.meteor_score import single_meteor_score

        if name == "bleu1":
            return self.bleu.sentence_score(prediction, [reference]).score / 100
        if name == "rouge1":
            return self.rouge.score(reference, prediction)["rouge1"].fmeasure
        if name == "meteor":
            return single_meteor_score(word_tokenize(reference), word_tokenize(prediction), alpha=0.9, beta=3, gamma=0.5)
        if name == "bertscore_f1":
            import contextlib
            import io

            with contextlib.redirect_stderr(io.StringIO()):
                return self.bert.score([prediction], [reference])[2].item()
        raise KeyError(name)


def compare(pairs: int = 2000, seed: int = 0) -> dict:
    """Time and compare both ways of scoring; prints the table and returns the totals."""
    from components.metrics import text as text_metrics
    from components.metrics.language_data import require_language_data

    require_language_data()
    predictions, references = synthetic_pairs(pairs, seed)
    predictions = [p.strip() for p in predictions]
    references = [r.strip() for r in references]
    suite = text_metrics.TextMetricSuite()
    bert = text_metrics.bertscore_for(suite.settings.bertscore)  # loaded once, shared by the suites below
    reference = ReferenceScorers(bert.model_path, bert.num_layers)
    # Load WordNet and warm both models outside the timings.
    reference.score("meteor", "warm up", "warm up")
    reference.score("bertscore_f1", "warm up", "warm up")
    suite.compute(["warm up"], ["warm up"])
    text_metrics._meteor_helpers.cache_clear()

    names = list(text_metrics.METRIC_NAMES)
    ref_values, ref_times = {}, {}
    for name in names:
        start = time.perf_counter()
        ref_values[name] = [reference.score(name, p, r) for p, r in zip(predictions, references)]
        ref_times[name] = time.perf_counter() - start

    # Metric by metric through the suite's public API, so each gets its own time.
    suite_values, suite_times, means = {}, {}, {}
    for name in names:
        one = text_metrics.TextMetricSuite(text_metrics.TextMetricSettings(metrics=(name,)))
        start = time.perf_counter()
        result = one.compute(predictions, references)
        suite_times[name] = time.perf_counter() - start
        suite_values[name], means[name] = result.per_sample[name], result.mean[name]

    print(f"pairs: {pairs} (seed {seed}), distinct texts: {len(set(predictions) | set(references))}, "
          f"BERTScore model: {bert.model_name} layer {bert.num_layers}")
    print(f"{'metric':<14}{'reference s':>12}{'suite s':>10}{'ratio':>8}{'max |diff|':>13}{'mean':>9}")
    worst = 0.0
    for name in names:
        diff = max(abs(a - b) for a, b in zip(suite_values[name], ref_values[name]))
        worst = max(worst, diff)
        print(f"{name:<14}{ref_times[name]:>12.2f}{suite_times[name]:>10.2f}{ref_times[name] / suite_times[name]:>7.1f}x"
              f"{diff:>13.2e}{means[name]:>9.4f}")
    ref_total, suite_total = sum(ref_times.values()), sum(suite_times.values())
    print(f"reference, one pair at a time: {ref_total:.2f} s")
    print(f"suite, whole list:             {suite_total:.2f} s")
    print(f"speed-up (reference / suite):  {ref_total / suite_total:.2f}x")
    print(f"max abs difference:            {worst:.2e}")
    return {"reference_s": ref_total, "suite_s": suite_total, "speedup": ref_total / suite_total, "max_abs_diff": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    compare(args.pairs, args.seed)


if __name__ == "__main__":
    main()
