import pytest

from prefix_lightning.evaluation import corpus_bleu


def test_hypothesis_equal_to_one_of_ragged_references_scores_100():
    hypotheses = ["The Eagle is a coffee shop near the river.", "Blue Spice serves cheap food in the centre."]
    references = [
        ["There is a coffee shop called The Eagle.", "The Eagle is a coffee shop near the river.", "Eagle: coffee."],
        ["Blue Spice serves cheap food in the centre."],
    ]
    assert corpus_bleu(hypotheses, references) == pytest.approx(100.0)


def test_13a_tokenization_splits_punctuation():
    assert corpus_bleu(["Hello, world. It is me."], [["Hello , world . It is me ."]]) == pytest.approx(100.0)


def test_ragged_references_score_each_hypothesis_against_its_own_references():
    # Repeating a reference changes neither the clipped n-gram counts nor the closest reference length,
    # so padding a short group with copies of its own reference must give the ragged score.
    hypotheses = ["a cheap pub in the city centre", "a family friendly restaurant near the river"]
    ragged = [["a pub in the centre", "a cheap pub near the centre of the city"], ["a restaurant by the river"]]
    padded = [ragged[0], ragged[1] * 2]
    assert corpus_bleu(hypotheses, ragged) == pytest.approx(corpus_bleu(hypotheses, padded))
    assert 0 < corpus_bleu(hypotheses, ragged) < 100


def test_a_group_with_fewer_references_gets_no_empty_one():
    # An empty reference (0 tokens) would be the closest length to a short output and lift its brevity penalty:
    # the short output of the one-reference group is measured against its own reference's length.
    hypotheses = ["a cheap pub in the city centre", "a restaurant"]
    ragged = [["a pub in the centre", "a cheap pub near the centre of the city"], ["a restaurant by the river"]]
    padded = [ragged[0], ragged[1] * 2]
    assert corpus_bleu(hypotheses, ragged) == pytest.approx(corpus_bleu(hypotheses, padded))


def test_adding_references_on_e2e_raises_the_score(data_dir):
    from prefix_lightning.data import group_references, read_e2e

    groups = group_references(read_e2e(data_dir / "e2e" / "devset.csv"))
    hypotheses = [refs[0] for _, refs in groups]
    scores = [corpus_bleu(hypotheses, [refs[1 : 1 + k] for _, refs in groups]) for k in (1, 2, 4, 8)]
    assert scores == sorted(scores) and scores[0] < scores[-1]


def test_an_added_reference_can_lower_bleu_through_the_brevity_penalty():
    # Documents BLEU itself (sacrebleu, mteval): the closest reference length decides the brevity penalty, so a
    # longer reference that is closer in length but shares no n-grams lowers the score. More references
    # never lower the clipped n-gram matches.
    hypothesis = ["a b c d e f g h i j"]
    one = corpus_bleu(hypothesis, [["a b c d e f g"]])
    two = corpus_bleu(hypothesis, [["a b c d e f g", "x x x x x x x x x x x x"]])
    assert two < one


@pytest.mark.parametrize(
    ("hypotheses", "references", "message"),
    [
        ([], [], "at least one hypothesis"),
        (["a b c d"], [], "1 hypotheses but 0"),
        (["a b c d"], [[]], "at least one reference"),
    ],
)
def test_bad_arguments_are_rejected(hypotheses, references, message):
    with pytest.raises(ValueError, match=message):
        corpus_bleu(hypotheses, references)
