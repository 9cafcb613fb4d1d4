"""Closed/yes-no VQA, diagnosis, retrieval, per-type aggregation and the results schema."""
from __future__ import annotations

import json

import numpy as np
import pytest

from components.metrics import results as R
from components.metrics.aggregate import aggregate_by_type, normalize_question_type
from components.metrics.diagnosis import binary_metrics, diagnosis_metrics
from components.metrics.retrieval import recall_at_k, retrieval_recalls, similarity_matrix
from components.metrics.vqa import (
    closed_correct_paper_rule,
    closed_vqa_scores,
    parse_choice,
    parse_yes_no,
    yes_no_scores,
)

OPTIONS = ["Liver", "Spleen", "Kidney", "Pancreas"]


def papers_rule(generated_text: str, answer_choice: str) -> int:
    """M3D / Med3DVLM eval_vqa.py: correct when the answer letter plus "." is in the text."""
    return 1 if answer_choice + "." in generated_text else 0


@pytest.mark.parametrize("text,answer,by_rule,parsed", [
    ("B", "B", 0, "B"),
    ("B.", "B", 1, "B"),
    ("(B)", "B", 0, "B"),
    ("Answer: B. Spleen", "B", 1, "B"),
    ("Answer: B. Spleen", "A", 0, "B"),
    ("B. Spleen, not A. Liver", "A", 1, "B"),   # "A." elsewhere satisfies the papers' rule
    ("The lesion is in the liver, see A. and C.", "A", 1, None),
    ("A large mass in the spleen.", "A", 0, None),
    ("The answer is (C)", "C", 0, "C"),
    ("Spleen", "B", 0, "B"),
    ("b. spleen", "B", 0, None),
    ("", "A", 0, None),
])
def test_closed_vqa_rule_matches_papers_and_parsing(text, answer, by_rule, parsed):
    assert closed_correct_paper_rule(text, answer) == bool(papers_rule(text, answer)) == bool(by_rule)
    assert parse_choice(text, OPTIONS) == parsed


def test_closed_vqa_scores_both_rules():
    scores = closed_vqa_scores(["B.", "(B)", "A. Liver"], ["B", "B", "B"], [OPTIONS] * 3)
    assert scores == {"accuracy": [1.0, 0.0, 0.0], "parsed_accuracy": [1.0, 1.0, 0.0]}


def test_yes_no():
    assert parse_yes_no("Yes, there is a nodule.") is True
    assert parse_yes_no("No. However, yes...") is False
    assert parse_yes_no("Not sure") is None
    scores = yes_no_scores(["Yes.", "no", "maybe", "NO, none"], ["Yes, it does.", True, "No", "no"])
    assert scores["accuracy"] == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        yes_no_scores(["yes"], ["perhaps"])


def test_binary_metrics_hand_computed():
    # tp=2 fp=1 fn=1 tn=4
    truth = [1, 1, 1, 0, 0, 0, 0, 0]
    pred = [1, 1, 0, 1, 0, 0, 0, 0]
    m = binary_metrics(truth, pred)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_binary_metrics_degenerate_cases_follow_sklearn_conventions():
    no_positive_predictions = binary_metrics([1, 0, 0], [0, 0, 0])
    assert no_positive_predictions["precision"] == 0.0 and no_positive_predictions["f1"] == 0.0
    only_negatives = binary_metrics([0, 0, 0, 0], [1, 0, 0, 0])
    assert only_negatives["balanced_accuracy"] == pytest.approx(0.75)  # recall of the one class present


def test_diagnosis_macro_micro_from_yes_no_answers():
    labels = ["Emphysema"] * 4 + ["Atelectasis"] * 4
    truths = [1, 1, 0, 0, 1, 0, 0, 0]
    answers = ["Yes, it does.", "No.", "No.", "Yes", "yes", "no", "I cannot tell", "no"]
    out = diagnosis_metrics(labels, truths, answers)
    emph, atel = out["per_label"]["Emphysema"], out["per_label"]["Atelectasis"]
    assert list(out["per_label"]) == ["Emphysema", "Atelectasis"]
    assert (emph["precision"], emph["recall"], emph["balanced_accuracy"]) == (0.5, 0.5, 0.5)
    assert (atel["precision"], atel["recall"], atel["balanced_accuracy"]) == (1.0, 1.0, 1.0)
    assert out["macro"]["f1"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["micro"]["precision"] == pytest.approx(2 / 3)  # pooled tp=2 fp=1
    assert out["n_unparsed"] == 1


def _med3dvlm_recall(similarity: np.ndarray, k: int) -> float:
    """Med3DVLM eval_clip.py's calculate_recall: the diagonal among each row's top k."""
    import torch

    sim = torch.as_tensor(similarity)
    _, topk = sim.topk(k, dim=1)
    return torch.eq(topk, torch.arange(sim.size(0)).view(-1, 1)).float().sum(dim=1).mean().item()


def test_retrieval_matches_med3dvlm_recall_without_ties():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(1200, 16))
    texts = images + rng.normal(scale=2.0, size=images.shape)
    sim = similarity_matrix(images, texts, normalize=True)
    out = retrieval_recalls(sim, sizes=(100, 500, 1000, 2000), ks=(1, 5, 10))
    assert out["skipped_sizes"] == [2000]
    for n in (100, 500, 1000):
        block = sim[:n, :n]
        for k in (1, 5, 10):
            assert out["image_to_text"][str(n)][f"R@{k}"] == pytest.approx(_med3dvlm_recall(block, k))
            assert out["text_to_image"][str(n)][f"R@{k}"] == pytest.approx(_med3dvlm_recall(block.T, k))


def test_recall_at_k_identity_and_ties():
    assert recall_at_k(np.eye(5), 1) == 1.0
    assert recall_at_k(np.ones((4, 4)), 1) == 1.0  # ties go to the match


def test_question_types_and_macro_micro():
    assert normalize_question_type(1) == "plane" and normalize_question_type("5") == "location"
    assert normalize_question_type("Organ") == "organ" and normalize_question_type(None) == "none"
    with pytest.raises(ValueError):
        normalize_question_type(6)
    per_sample = {"accuracy": [1, 1, 1, 0, 0, 1]}
    out = aggregate_by_type(per_sample, [3, 1, 1, 1, 2, 2])
    assert list(out.per_type) == ["plane", "phase", "organ"]
    assert out.per_type["plane"] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert out.micro["accuracy"] == pytest.approx(4 / 6)
    assert out.macro["accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    untyped = aggregate_by_type({"bleu1": [0.2, 0.4]})
    assert untyped.macro == untyped.micro == {"bleu1": pytest.approx(0.3)}


def test_generation_settings_do_sample_is_a_real_boolean():
    assert R.GenerationSettings().to_dict()["do_sample"] is False
    with pytest.raises(TypeError):
        R.GenerationSettings(do_sample="False")


def test_run_result_schema_round_trip(tmp_path):
    closed = R.closed_vqa_task("m3d_vqa", ["B.", "A", "C. Kidney"], ["B", "A", "D"], [OPTIONS] * 3, [1, 2, 2])
    yn = R.yes_no_task("ct_rate_vqa", ["Yes", "No"], ["yes", "yes"])
    diag = R.diagnosis_task("ct_rate", ["a", "a"], [1, 0], ["yes", "no"])
    retr = R.retrieval_task("m3d_cap", np.eye(120), sizes=(100, 500))
    result = R.run_result("run-1", [closed, yn, diag, retr], R.GenerationSettings(max_new_tokens=64), {"name": "tiny"})
    path = R.save_result(result, tmp_path / "run-1.json")
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded["generation"]["do_sample"] is False
    assert loaded["tasks"][0]["per_type"]["phase"] == {"n": 2, "accuracy": 0.0, "parsed_accuracy": 0.5}
    assert loaded["tasks"][0]["macro"]["accuracy"] == pytest.approx(0.5)
    assert R.load_results([path]) == [loaded]
    bad = dict(loaded, generation=dict(loaded["generation"], do_sample="false"))
    with pytest.raises(ValueError, match="do_sample"):
        R.validate_result(bad)
    bad_task = dict(loaded, tasks=[dict(loaded["tasks"][0], micro={"accuracy": "high"})])
    with pytest.raises(ValueError, match=r"tasks\[0\]\.micro\.accuracy"):
        R.validate_result(bad_task)


def test_lesion_attention_compares_against_the_slices_share(tmp_path):
    from components.metrics.slice_attention import lesion_attention, plot_slice_attention

    mask = np.zeros(8, bool)
    mask[2:4] = True
    uniform = np.full(8, 1 / 8)
    focused = np.where(mask, 0.3, 0.4 / 6)
    r = lesion_attention([uniform, focused], [mask, mask], ["organ", "location"])
    assert r["lesion_slice_share"] == pytest.approx(0.25)
    assert r["attention_on_lesion"] == pytest.approx((0.25 + 0.6) / 2)
    assert r["questions_above_share"] == 0.5 and r["per_type"]["location"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="shape"):
        lesion_attention([uniform], [mask[:4]])
    png = plot_slice_attention([uniform, focused], [mask, mask], ["q1", "q2"], "t", str(tmp_path / "h.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_lesion_attention_separates_a_habit_of_looking_at_the_middle_from_finding_the_lesion():
    from components.metrics.slice_attention import lesion_attention

    masks = []
    for start in (3, 4, 5, 2, 6):  # lesions cluster around the middle of 12 slices, as organs do
        m = np.zeros(12, bool)
        m[start:start + 2] = True
        masks.append(m)
    middle = np.exp(-0.5 * ((np.arange(12) - 5.5) / 1.5) ** 2)
    habit = lesion_attention([middle] * len(masks), masks)
    assert habit["ratio"] > 1.3  # the uniform share alone would credit it
    assert habit["ratio_to_positional"] == pytest.approx(1.0)  # it looks where it always looks
    assert habit["sign_test_p"] == 1.0  # every question ties with the habit
    follows = lesion_attention([np.where(m, 1.0, 0.05) for m in masks], masks)
    assert follows["ratio"] > 3 and follows["ratio_to_positional"] > 2
    assert follows["questions_above_positional"] == 1.0 and follows["sign_test_p"] == pytest.approx(1 / 32)


def test_sign_test_matches_the_binomial_tail():
    from components.metrics.slice_attention import sign_test_p

    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 0) == pytest.approx(1 / 8)
    assert sign_test_p(2, 1) == pytest.approx(4 / 8)
    assert sign_test_p(60, 40) == pytest.approx(0.02844, abs=1e-4)


def _result(acc, meteor):
    """An evaluation's results with just the two figures the learning proof reads."""
    return {"run": "r", "tasks": [{"task": "vqa_closed", "micro": {"accuracy": acc}},
                                  {"task": "caption", "micro": {"meteor": meteor}}]}


# slice attention that meets condition 3: 3x the lesion's share, above the habit, significant
LOOKS = {"attention_on_lesion": 0.3, "lesion_slice_share": 0.1, "positional_share": 0.12, "sign_test_p": 1e-6}


def test_learning_proof_needs_all_three_conditions():
    from components.metrics.learning_proof import learning_proof

    proof = learning_proof(_result(0.6, 0.3), _result(0.27, 0.2), LOOKS)
    assert proof["passed"] and [c["passed"] for c in proof["conditions"]] == [True, True, True]
    # a blind twin far above chance means the text leaks the answer: not a proof
    assert not learning_proof(_result(0.6, 0.3), _result(0.4, 0.2), LOOKS)["conditions"][0]["passed"]
    assert not learning_proof(_result(0.45, 0.3), _result(0.25, 0.2), LOOKS)["passed"]
    assert not learning_proof(_result(0.6, 0.2), _result(0.25, 0.2), LOOKS)["conditions"][1]["passed"]
    # near-uniform slice weights do not count as looking at the lesion
    even = dict(LOOKS, attention_on_lesion=0.1001)
    assert not learning_proof(_result(0.6, 0.3), _result(0.25, 0.2), even)["conditions"][2]["passed"]
    # nor does looking where it always looks, or an edge over that habit no larger than chance gives
    habit = dict(LOOKS, positional_share=0.3)
    assert not learning_proof(_result(0.6, 0.3), _result(0.25, 0.2), habit)["conditions"][2]["passed"]
    luck = dict(LOOKS, sign_test_p=0.2)
    assert not learning_proof(_result(0.6, 0.3), _result(0.25, 0.2), luck)["conditions"][2]["passed"]
    assert not learning_proof(_result(0.6, 0.3), _result(0.25, 0.2), None)["passed"]


def test_quickstart_fails_on_an_unmet_proof_only_when_told_to():
    from components.config import load
    from components.metrics.learning_proof import learning_proof
    from ray_jobs.quickstart import DEFAULT_CONFIG, QuickstartConfig, exit_status

    unmet = learning_proof(_result(0.6, 0.3), _result(0.25, 0.2), None)
    met = learning_proof(_result(0.6, 0.3), _result(0.25, 0.2), LOOKS)
    shipped = load(QuickstartConfig, DEFAULT_CONFIG)
    gate = load(QuickstartConfig, DEFAULT_CONFIG, ["require_proof=true"])
    # every stage ran: the shipped command succeeds and prints the verdict either way
    assert [exit_status(shipped, p) for p in (met, unmet, None)] == [0, 0, 0]
    assert [exit_status(gate, p) for p in (met, unmet, None)] == [0, 1, 0]
