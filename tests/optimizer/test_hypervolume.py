"""`optimizer.hypervolume`: exact, hand-computed cases in 1-3 dimensions, what adds nothing, and
agreement with counting the dominated cells of a grid."""

import itertools
import random

import pytest

from optimizer import HypervolumeError, hypervolume


def test_one_point_is_its_box():
    assert hypervolume([(1.0, 2.0)], (4.0, 6.0)) == 12.0
    assert hypervolume([(1.0, 2.0, 3.0)], (2.0, 4.0, 7.0)) == 8.0
    assert hypervolume([(2.5,), (1.0,)], (4.0,)) == 3.0


def test_two_dimensions_by_hand():
    # Boxes [1,4]x[3,4] (3) and [2,4]x[1,4] (6) overlap in [2,4]x[3,4] (2): 3 + 6 - 2 = 7.
    assert hypervolume([(1, 3), (2, 1)], (4, 4)) == 7.0
    # A staircase of three: strips 4*1 + 3*1 + 2*1 (x from 0, 1, 2 to 4; y bands [3,4], [2,3], [1,2]).
    assert hypervolume([(2, 1), (0, 3), (1, 2)], (4, 4)) == 9.0


def test_three_dimensions_by_hand():
    # [0,2]x[0,2]x[1,2] (volume 4) and [1,2]x[1,2]x[0,2] (volume 2), overlapping in [1,2]^2 x [1,2] (1).
    assert hypervolume([(0, 0, 1), (1, 1, 0)], (2, 2, 2)) == 5.0
    points = [(0, 1, 1), (1, 0, 1), (1, 1, 0)]
    # Boxes: [0,2]x[1,2]x[1,2] = 2, [1,2]x[0,2]x[1,2] = 2, [1,2]x[1,2]x[0,2] = 2; pairwise overlaps
    # [1,2]^3 = 1 each, triple overlap 1: 6 - 3 + 1 = 4.
    assert hypervolume(points, (2, 2, 2)) == 4.0


def test_dominated_and_duplicate_points_add_nothing():
    front = [(1, 3, 2), (2, 1, 3), (3, 2, 1)]
    base = hypervolume(front, (4, 4, 4))
    assert hypervolume(front + [(2, 3, 3), (3, 3, 2), (1, 3, 2)], (4, 4, 4)) == base
    assert hypervolume([(1, 3), (2, 1), (3, 3), (2, 1)], (4, 4)) == hypervolume([(1, 3), (2, 1)], (4, 4))


def test_points_at_or_beyond_the_reference_are_ignored():
    assert hypervolume([(5, 0), (0, 4), (4, 4)], (4, 4)) == 0.0
    assert hypervolume([(1, 1, 1), (0, 0, 9), (9, 0, 0)], (2, 2, 2)) == 1.0
    assert hypervolume([], (1, 1)) == 0.0


def test_order_does_not_matter():
    rng = random.Random(3)
    points = [tuple(rng.random() for _ in range(3)) for _ in range(30)]
    shuffled = points[:]
    rng.shuffle(shuffled)
    assert hypervolume(points, (1, 1, 1)) == pytest.approx(hypervolume(shuffled, (1, 1, 1)), abs=1e-12)


def _grid_count(points: list[tuple[int, ...]], size: int) -> int:
    """Unit cells [c, c+1]^d of [0, size]^d dominated by some point: an exact volume for integer points."""
    return sum(
        any(all(p_i <= c_i for p_i, c_i in zip(p, cell)) for p in points)
        for cell in itertools.product(range(size), repeat=len(points[0]))
    )


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", range(5))
def test_equals_counting_dominated_grid_cells(dims, seed):
    rng = random.Random(seed)
    size = 7
    points = [tuple(rng.randrange(size) for _ in range(dims)) for _ in range(rng.randrange(1, 12))]
    assert hypervolume(points, (size,) * dims) == _grid_count(points, size)


def test_real_valued_points_against_a_fine_grid():
    rng = random.Random(11)
    points = [tuple(rng.random() for _ in range(3)) for _ in range(8)]
    steps = 40
    centres = [(i + 0.5) / steps for i in range(steps)]
    dominated = sum(
        any(all(p_i <= c_i for p_i, c_i in zip(p, cell)) for p in points)
        for cell in itertools.product(centres, repeat=3)
    )
    assert hypervolume(points, (1, 1, 1)) == pytest.approx(dominated / steps**3, abs=0.02)


@pytest.mark.parametrize(
    ("points", "reference", "message"),
    [
        ([(1, 2)], (1, 2, 3, 4), "1, 2 or 3 coordinates"),
        ([(1, 2)], (), "1, 2 or 3 coordinates"),
        ([(1, 2, 3)], (4, 4), "point 0 has 3 coordinates but the reference point has 2"),
        ([(1, float("nan"))], (4, 4), "point 0: every coordinate must be a finite real number"),
        ([(1, 2)], (4, float("inf")), "reference point: every coordinate must be a finite real number"),
        ([(1, "2")], (4, 4), "finite real number"),
        ([(True, 2)], (4, 4), "finite real number"),
        ([3], (4,), "point 0 must be a sequence"),
        ([(1, 2)], 4, "reference point must be a sequence"),
    ],
)
def test_bad_input_is_named(points, reference, message):
    with pytest.raises(HypervolumeError, match=message):
        hypervolume(points, reference)
