"""Attention-map statistics on hand-made maps with known answers, and the summary / histogram shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from attnpipe.evaluate.attention import histogram, per_image_stats, summarize

NAN_BOX = [np.nan] * 4


def one_hot(h: int, w: int, i: int, j: int) -> np.ndarray:
    a = np.zeros((h, w), np.float32)
    a[i, j] = 1.0
    return a


def test_uniform_map():
    s = per_image_stats(np.full((1, 4, 5), 1 / 20, np.float16))  # float16 storage: renormalized on the way in
    assert s["entropy"][0] == pytest.approx(1.0) and s["effective_area"][0] == pytest.approx(1.0)
    assert s["peak"][0] == pytest.approx(1 / 20) and s["top10_mass"][0] == pytest.approx(2 / 20)  # ceil(20/10) = 2
    assert (s["center_x"][0], s["center_y"][0]) == pytest.approx((0.5, 0.5))
    # spread: sqrt(E[(x - .5)^2] + E[(y - .5)^2]) over the cell centres of a 4 x 5 grid
    xs, ys = (np.arange(5) + 0.5) / 5, (np.arange(4) + 0.5) / 4
    assert s["spread"][0] == pytest.approx(math.sqrt(np.mean((xs - 0.5) ** 2) + np.mean((ys - 0.5) ** 2)))
    assert "box_mass" not in s


def test_one_hot_map_and_pointing():
    maps = np.stack([one_hot(4, 4, 1, 2)] * 3)  # the cell (row 1, col 2): centre (0.625, 0.375)
    boxes = np.array([[0.5, 0.25, 0.75, 0.5], [0.0, 0.0, 0.5, 0.5], NAN_BOX])
    s = per_image_stats(maps, boxes)
    np.testing.assert_allclose(s["entropy"], 0.0, atol=1e-12)
    np.testing.assert_allclose(s["effective_area"], 1 / 16)
    np.testing.assert_allclose(s["peak"], 1.0)
    np.testing.assert_allclose(s["center_x"], 0.625)
    np.testing.assert_allclose(s["center_y"], 0.375)
    np.testing.assert_array_equal(s["spread"], 0.0)
    np.testing.assert_array_equal(s["pointing_hit"][:2], [1.0, 0.0])
    np.testing.assert_array_equal(s["box_mass"][:2], [1.0, 0.0])  # the first box covers exactly that cell
    assert np.isnan(s["pointing_hit"][2]) and np.isnan(s["box_mass"][2])


def test_box_mass_is_area_weighted():
    uniform = np.full((4, 4, 4), 1 / 16)
    cell = one_hot(4, 4, 0, 0)[None]
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.5, 1], [0.1, 0.2, 0.6, 0.7], [0.5, 0.5, 0.0, 0.0]])  # last: swapped
    s = per_image_stats(uniform, boxes)
    np.testing.assert_allclose(s["box_mass"], [1.0, 0.5, 0.5 * 0.5, 0.25])  # uniform: mass = box area
    half = per_image_stats(cell, np.array([[0.0, 0.0, 0.125, 0.25]]))  # left half of the top-left cell
    assert half["box_mass"][0] == pytest.approx(0.5)
    assert half["pointing_hit"][0] == 1.0  # the cell centre (0.125, 0.125) is on the box's right edge: inside
    edge = per_image_stats(cell, np.array([[0.0, 0.0, 0.12, 0.25]]))
    assert edge["pointing_hit"][0] == 0.0 and edge["box_mass"][0] == pytest.approx(0.48)


def test_top10_mass_and_degenerate_maps():
    a = np.zeros((1, 3, 10))
    a[0, 0, :3] = [0.5, 0.2, 0.1]  # ceil(30 / 10) = 3 largest cells
    a[0, 1, :] = 0.02
    s = per_image_stats(a)
    assert s["top10_mass"][0] == pytest.approx(0.8)
    single = per_image_stats(np.ones((2, 1, 1)))
    np.testing.assert_array_equal(single["entropy"], 0.0)  # hw == 1
    np.testing.assert_array_equal(single["effective_area"], 1.0)
    dead = per_image_stats(np.zeros((1, 2, 2)), np.array([[0, 0, 1, 1]]))
    assert all(np.isnan(v[0]) for v in dead.values())  # no mass: no distribution
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        per_image_stats(np.ones((2, 4)))
    with pytest.raises(ValueError, match="boxes must be"):
        per_image_stats(np.ones((2, 2, 2)), np.ones((3, 4)))


def test_summarize_groups_labels_and_skips_nans():
    maps = np.stack([np.full((2, 2), 0.25), one_hot(2, 2, 0, 0), one_hot(2, 2, 1, 1), np.full((2, 2), 0.25)])
    boxes = np.array([NAN_BOX, [0, 0, 0.5, 0.5], NAN_BOX, NAN_BOX])
    out = summarize(per_image_stats(maps, boxes), ["cat", "dog", "dog", None])
    assert out["count"] == 4
    assert out["overall"]["entropy"] == pytest.approx(0.5)
    assert out["overall"]["box_mass"] == 1.0 and out["overall"]["pointing_game"] == 1.0  # one box, NaNs skipped
    assert list(out["per_label"]) == ["(none)", "cat", "dog"]
    dog = out["per_label"]["dog"]
    assert dog["count"] == 2 and dog["entropy"] == 0.0 and dog["center_x"] == pytest.approx(0.5)
    assert dog["pointing_game"] == 1.0 and "box_mass" in dog
    assert "box_mass" not in out["per_label"]["cat"] and "pointing_game" not in out["per_label"]["(none)"]
    assert "pointing_hit" not in out["overall"]
    json.dumps(out, allow_nan=False)  # plain floats, no NaN
    assert all(type(v) is float for v in out["overall"].values())

    no_boxes = summarize(per_image_stats(maps, np.full((4, 4), np.nan)))
    assert "box_mass" not in no_boxes["overall"] and "pointing_game" not in no_boxes["overall"]
    assert no_boxes["per_label"] == {}
    with pytest.raises(ValueError, match="labels has 2 entries for 4 images"):
        summarize(per_image_stats(maps), ["a", "b"])


def test_histogram():
    values = np.array([0.0, 0.04, 0.5, 0.99, 1.0, 1.2, np.nan])
    h = histogram(values, bins=10)
    assert len(h["edges"]) == 11 and h["edges"][0] == 0.0 and h["edges"][-1] == 1.0
    assert sum(h["counts"]) == 6  # NaN dropped, 1.2 clipped into the last bin
    assert h["counts"][0] == 2 and h["counts"][5] == 1 and h["counts"][-1] == 3
    ent = per_image_stats(np.random.default_rng(0).random((50, 7, 7)))["entropy"]
    assert sum(histogram(ent)["counts"]) == 50
    json.dumps(h, allow_nan=False)
    with pytest.raises(ValueError, match="bins >= 1"):
        histogram(values, bins=0)
