"""The official-metric scorers: hand-checked small cases, E2E maxima and documented values, Java fallbacks.

Values marked "documented" were computed once and cross-checked outside this repository against the official code:
e2e-metrics' `metrics/pymteval.py` (BLEU identical, NIST equal to 1e-14) and pycocoevalcap's own `PTBTokenizer`
plus scorers, as e2e-metrics' `run_coco_eval` calls them (METEOR, ROUGE_L and CIDEr identical). The WebNLG/DART
pipeline reproduced the WebNLG 2017 challenge's published evaluation files (ADAPT_Centre, 7-triple subset: BLEU
62.96, METEOR 0.43542716715861496, TER 0.3729966002914036) from the raw test XML and that team's output.
"""

from __future__ import annotations

import math
import shutil
import warnings

import pytest

from prefix_lightning.data import group_references, read_e2e
from prefix_lightning.evaluation import SUITES, MetricSkippedWarning, corpus_bleu, score
from prefix_lightning.evaluation.java import JavaUnavailable
from prefix_lightning.evaluation.mteval import NIST_BETA, ShortOutputWarning, mteval_bleu_nist, tokenize
from prefix_lightning.evaluation.table_to_text import dart_text, webnlg_output, webnlg_reference

# The Java scorers (METEOR 1.5, the PTB tokenizer of ROUGE_L and CIDEr) run in a JVM, a subprocess: their tests are
# marked integration.
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")

# Documented: the first 100 test MRs with two or more references; output = the last reference, scored
# against the others (a "human system", so every number is realistic and stable).
HUMAN_SYSTEM_100 = {
    "BLEU": 55.056375005938726,
    "NIST": 7.581222970938009,
    "METEOR": 0.4510227997801632,
    "ROUGE_L": 0.6454934556821166,
    "CIDEr": 2.425460334032711,
}


@pytest.fixture(scope="module")
def e2e_groups(data_dir) -> list[list[str]]:
    groups = group_references(read_e2e(data_dir / "e2e" / "testset_w_refs.csv"))
    assert len(groups) == 630 and sum(len(refs) for _, refs in groups) == 4693
    return [refs for _, refs in groups]


@pytest.fixture(scope="module")
def human_system(e2e_groups) -> tuple[list[str], list[list[str]]]:
    groups = [refs for refs in e2e_groups if len(refs) > 1][:100]
    return [refs[-1] for refs in groups], [refs[:-1] for refs in groups]


def _fail_meteor(*args, **kwargs):
    raise JavaUnavailable("disabled in this test (its JVM start is slow; METEOR has its own test)")


# -- E2E: BLEU and NIST (e2e-metrics' mteval port) ------------------------------------------------------------
def test_mteval_bleu_and_nist_by_hand():
    # Output "a b c d e", reference "a b c d e f": every n-gram matches, so BLEU is the brevity penalty
    # exp(1 - 6/5). NIST: a unigram's information is log2(6 reference words / 1 occurrence); every longer n-gram
    # always follows its prefix (information log2(1/1) = 0). Five matched unigrams over five output unigrams give
    # log2(6), times the length penalty exp(-beta * ln(5/6)^2), beta = -ln(0.5) / ln(1.5)^2.
    bleu, nist = mteval_bleu_nist(["a b c d e"], [["a b c d e f"]])
    assert bleu == pytest.approx(math.exp(-0.2))
    assert round(NIST_BETA, 4) == 4.2162
    assert nist == pytest.approx(math.log2(6) * math.exp(-NIST_BETA * math.log(5 / 6) ** 2))


def test_mteval_tokenizes_13a_and_ignores_case():
    expected = ["the", "eagle", ",", "near", "café", "rouge", ",", "costs", "£20", "-", "25", "."]
    assert tokenize("The Eagle, near Café Rouge, costs £20-25.") == expected
    assert tokenize("") == [""]  # e2e-metrics counts an empty output as one (empty) token
    bleu, _ = mteval_bleu_nist(["The Eagle, a pub."], [["the eagle , a pub .", "something else"]])
    assert bleu == pytest.approx(1.0)


def test_mteval_survives_outputs_shorter_than_the_ngram_order():
    # e2e-metrics itself raises ZeroDivisionError in NIST here (no 5-gram in any output); the order counts as 0.
    with pytest.warns(ShortOutputWarning, match="1 of 1 outputs have fewer than 4 tokens"):
        bleu, nist = mteval_bleu_nist(["Error"], [["The Eagle is a pub near the river."]])
    assert 0 < bleu < 1e-6 and math.isfinite(nist)


def test_mteval_says_when_short_outputs_inflate_the_scores():
    """Two empty outputs of three push e2e-metrics' BLEU past its scale (115.85 on 0-1, as the official script
    prints it): the user is told; a corpus of outputs long enough is not warned about."""
    references = [["the eagle is a pub"]] * 3
    with pytest.warns(ShortOutputWarning, match="2 of 3 outputs"):
        bleu, _ = mteval_bleu_nist(["the eagle is a pub", "", ""], references)
    assert bleu > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mteval_bleu_nist(["the eagle is a pub"] * 3, references)[0] == pytest.approx(1.0)


def test_e2e_bleu_equals_sacrebleu_lowercased_on_a_realistic_system(e2e_groups):
    # On outputs of normal length, e2e-metrics' BLEU is mteval-v13a's: sacrebleu with 13a and lowercasing agrees.
    groups = [refs for refs in e2e_groups if len(refs) > 1]
    hypotheses, references = [refs[-1] for refs in groups], [refs[:-1] for refs in groups]
    reference = corpus_bleu([h.lower() for h in hypotheses], [[r.lower() for r in refs] for refs in references])
    assert 100 * mteval_bleu_nist(hypotheses, references)[0] == pytest.approx(reference, abs=1e-9)


# -- E2E: the five metrics ----------------------------------------------------------------------------------
@pytest.mark.integration
@needs_java
def test_e2e_references_against_themselves_reach_the_maxima(e2e_groups, monkeypatch):
    # Each output is one of its group's references: every n-gram matches and the closest reference has the
    # output's length (BLEU 100); the identical reference gives LCS precision and recall 1 (ROUGE_L 1).
    monkeypatch.setattr("prefix_lightning.evaluation.e2e_metrics.meteor", _fail_meteor)
    with pytest.warns(MetricSkippedWarning, match="METEOR not computed: disabled") as record:
        scores = score("e2e", [refs[0] for refs in e2e_groups], e2e_groups)
    assert len(record) == 1
    assert list(scores) == ["BLEU", "NIST", "ROUGE_L", "CIDEr"]
    assert scores["BLEU"] == pytest.approx(100.0, abs=1e-9)
    assert scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    assert scores["NIST"] > HUMAN_SYSTEM_100["NIST"] and scores["CIDEr"] > HUMAN_SYSTEM_100["CIDEr"]


@pytest.mark.integration
@needs_java
def test_e2e_human_system_gives_the_documented_values(human_system):
    # The one test that runs METEOR 1.5 (a JVM loading its paraphrase table: several seconds).
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricSkippedWarning)
        scores = score("e2e", *human_system)
    assert list(scores) == list(HUMAN_SYSTEM_100)
    assert scores == pytest.approx(HUMAN_SYSTEM_100, rel=1e-9)


def test_e2e_without_java_skips_the_java_metrics_with_one_warning(human_system, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.warns(MetricSkippedWarning) as record:
        scores = score("e2e", *human_system)
    assert len(record) == 1
    assert "METEOR, ROUGE_L, CIDEr not computed: no `java` on PATH" in str(record[0].message)
    assert scores == pytest.approx({key: HUMAN_SYSTEM_100[key] for key in ("BLEU", "NIST")}, rel=1e-12)


# -- WebNLG and DART ----------------------------------------------------------------------------------------
def test_webnlg_and_dart_normalize_as_their_scripts():
    text = "Adolfo Suárez Madrid–Barajas Airport's runway is 3,500m long."
    expected = "adolfo suarez madrid - barajas airport ' s runway is 3 , 500m long ."
    assert webnlg_output(text) == webnlg_reference(text) == expected
    assert dart_text("In the 2001 movie Piñero, he was cast.") == "in the 2001 movie piñero , he was cast ."


@pytest.fixture()
def no_meteor(monkeypatch):
    monkeypatch.setattr("prefix_lightning.evaluation.table_to_text.meteor", _fail_meteor)
    with pytest.warns(MetricSkippedWarning, match="METEOR not computed"):
        yield


def test_webnlg_bleu_uses_three_references_and_the_empty_lines_of_the_reference_files(no_meteor):
    # Only the first three references count.
    assert score("webnlg", ["x y z w"], [["a b c d", "e f g h", "i j k l", "x y z w"]])["BLEU"] == 0.0
    # multi-bleu reads one file per reference slot; an entry with fewer references has empty lines there, which
    # are zero-length references. Alone, "x y" is closest to its 8-word reference: brevity penalty
    # exp(1 - (4 + 8) / 6) = 1/e with every n-gram matching. Next to an entry with three references, the empty
    # slot (distance 2) is closest: reference length 4 + 0 < 6, no penalty.
    hypotheses = ["a b c d", "x y"]
    alone = score("webnlg", hypotheses, [["a b c d"], ["x y z w v u t s"]])
    beside = score("webnlg", hypotheses, [["a b c d"] * 3, ["x y z w v u t s"]])
    assert alone["BLEU"] == pytest.approx(100 / math.e)
    assert beside["BLEU"] == pytest.approx(100.0)


def test_webnlg_ter_takes_the_fewest_edits_over_the_mean_reference_length(no_meteor):
    scores = score("webnlg", ["A b c d"], [["a b x d", "a b c d e f"]])
    assert scores["TER"] == pytest.approx(1 / 5)  # one substitution; (4 + 6) / 2 reference words
    assert list(scores) == ["BLEU", "TER"]


def test_dart_scores_against_the_first_three_references(monkeypatch):
    # run_eval_on_dart.sh: BLEU over its three reference files; prepare_files.py gives METEOR (-r 8) and TER the
    # non-empty lines of the same three files, not the first reference alone.
    asked = []
    monkeypatch.setattr(
        "prefix_lightning.evaluation.table_to_text.meteor", lambda outputs, refs: asked.append(refs) or 0.5
    )
    references = [["The cat sat on the mat.", "A cat was sitting on the mat.", "Cats sit.", "A dog."]]
    on_second = score("dart", ["A cat was sitting on the mat."], references)
    assert on_second["BLEU"] == pytest.approx(100.0) and on_second["TER"] == 0.0
    assert asked[0] == [["the cat sat on the mat .", "a cat was sitting on the mat .", "cats sit ."] + [""] * 5]
    assert score("dart", ["A dog."], references)["TER"] > 0  # only the first three count


@pytest.mark.integration
@needs_java
def test_a_failing_meteor_jar_is_skipped_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr("prefix_lightning.evaluation.java.METEOR_JAR", tmp_path / "missing-meteor.jar")
    with pytest.warns(
        MetricSkippedWarning, match="METEOR not computed: METEOR 1.5 .* Unable to access jarfile"
    ) as record:
        scores = score("webnlg", ["a b c d"], [["a b c d"]])
    assert len(record) == 1
    assert scores == {"BLEU": pytest.approx(100.0), "TER": 0.0}


# -- XSum, BLEU, dispatch -------------------------------------------------------------------------------------
def test_xsum_rouge_stems_by_hand():
    # Stemmed tokens: the cat are run / the cat is run. ROUGE-1: 3 of 4 both ways; ROUGE-2: 1 of 3 bigrams;
    # ROUGE-L: LCS "the cat run" = 3 of 4. F-measures, times 100.
    scores = score("xsum", ["The cats are running."], [["The cat is running."]])
    assert scores == pytest.approx({"rouge1": 75.0, "rouge2": 100 / 3, "rougeL": 75.0})


def test_xsum_rouge_is_the_f_measure_of_precision_and_recall():
    # the cat are run / the cat is run fast today. ROUGE-1 and ROUGE-L: 3 hits, precision 3/4, recall 3/6, F 0.6;
    # ROUGE-2: 1 hit, precision 1/3, recall 1/5, F 0.25. Times 100.
    scores = score("xsum", ["The cats are running."], [["The cat is running fast today."]])
    assert scores == pytest.approx({"rouge1": 60.0, "rouge2": 25.0, "rougeL": 60.0})


def test_xsum_takes_the_best_reference_and_averages_over_outputs():
    scores = score("xsum", ["a b", "c d"], [["x y", "a b"], ["x y"]])
    assert scores == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})


def test_bleu_suite_is_corpus_bleu():
    hypotheses, references = ["The Eagle is a pub."], [["The Eagle is a pub near the river.", "A pub."]]
    assert score("bleu", hypotheses, references) == {"BLEU": corpus_bleu(hypotheses, references)}


def test_unknown_suite_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="unknown metric suite 'rouge'; choose one of e2e, webnlg, dart, xsum, bleu"):
        score("rouge", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        score("e2e", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="must be strings"):
        score("xsum", [None], [["a"]])
    assert list(SUITES) == ["e2e", "webnlg", "dart", "xsum", "bleu"]
