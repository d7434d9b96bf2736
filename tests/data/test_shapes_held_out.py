"""Held-out colour x shape x position triples: never drawn for training, scored apart by the shapes suite."""
from itertools import product

import numpy as np
import pytest
import torch

from ldm.data.shapes import COLORS, HELD_OUT, POSITIONS, SHAPES, ShapesDataset, sample_attributes
from ldm.eval.suites import Interleaved, ShapesSuite, _stack


def _triples(dataset: ShapesDataset) -> list[tuple[str, str, str]]:
    return [(COLORS[o.color], SHAPES[o.shape], POSITIONS[o.position])
            for i in range(len(dataset)) for o in dataset.scene(i)]


def test_held_out_triples_are_new_combinations_of_seen_words_and_pairs():
    seen = set(product(COLORS, SHAPES, POSITIONS)) - HELD_OUT
    assert len(HELD_OUT) == 10 and HELD_OUT < set(product(COLORS, SHAPES, POSITIONS))
    for k, vocab in enumerate((COLORS, SHAPES, POSITIONS)):
        assert {t[k] for t in HELD_OUT} <= {t[k] for t in seen} == set(vocab)  # every word still trained on
    for a, b in ((0, 1), (0, 2), (1, 2)):  # and every pair of words, in some other triple
        assert {(t[a], t[b]) for t in seen} == set(product(*[(COLORS, SHAPES, POSITIONS)[i] for i in (a, b)]))


@pytest.mark.parametrize("num_objects", [1, 2])
def test_seen_scenes_never_hold_a_held_out_triple_and_held_out_scenes_only_those(num_objects):
    seen = _triples(ShapesDataset(size=300, num_objects=num_objects, combinations="seen"))
    held = _triples(ShapesDataset(size=100, num_objects=num_objects, seed=7, combinations="held_out"))
    assert not set(seen) & HELD_OUT and len(set(seen)) > 60  # the rest of the 90 triples, nearly all drawn
    assert set(held) == HELD_OUT  # all 10, and nothing else
    everything = _triples(ShapesDataset(size=300, num_objects=num_objects))
    assert 0.05 < sum(t in HELD_OUT for t in everything) / len(everything) < 0.2  # "all": about 10 / 90
    if num_objects == 2:
        data = ShapesDataset(size=50, num_objects=2, seed=7, combinations="held_out")
        assert all(len({o.position for o in data.scene(i)}) == 2 for i in range(50))


def test_all_combinations_draw_the_scenes_they_always_drew():
    rng = np.random.default_rng([0, 5])
    before = sample_attributes(rng, 2)
    assert ShapesDataset(size=10, num_objects=2).scene(5) == before  # same generator calls: caches stay valid
    with pytest.raises(ValueError, match="combinations"):
        ShapesDataset(size=10, combinations="unseen")


def test_interleaved_spreads_the_held_out_prompts_evenly():
    seen, held = ShapesDataset(size=12, combinations="seen"), ShapesDataset(size=4, combinations="held_out")
    mixed = Interleaved(seen, held)
    flags = [mixed[i]["held_out"] for i in range(len(mixed))]
    assert len(mixed) == 16 and sum(flags) == 4 and flags[:4].count(True) == 1  # one in every four
    assert [mixed[i]["caption"] for i in range(16) if not flags[i]] == [seen[i]["caption"] for i in range(12)]
    assert [mixed[i]["caption"] for i in range(16) if flags[i]] == [held[i]["caption"] for i in range(4)]


def test_suite_scores_seen_and_held_out_prompts_apart(shapes_feature_weights):
    suite = ShapesSuite(num_samples=30, seed=3, feature_weights=str(shapes_feature_weights), combinations="seen",
                        held_out_samples=10)
    real = _stack(suite.prompts)
    assert real["held_out"].sum() == 10 and len(real["image"]) == 40
    floor = suite.floor()
    assert floor["seen_acc_binding"] == floor["held_out_acc_binding"] == floor["acc_binding"] == 1.0
    # spoil only the held-out images (colours swapped): only their scores drop
    images = real["image"].clone()
    images[real["held_out"]] = images[real["held_out"]].flip(1)
    scores = suite.score(images)
    assert scores["seen_acc_color"] == 1.0 and scores["held_out_acc_color"] < 0.8
    assert scores["acc_color"] == pytest.approx((30 + 10 * scores["held_out_acc_color"]) / 40)
