"""The label layout (stemnet.data.layout): channel indices and the eight symmetries."""

import numpy as np
import pytest

from stemnet.data.layout import (
    DISPLACEMENT_CHANNELS,
    ELEMENTS,
    SWAP_XY,
    column_channel,
    d4_array,
    d4_inverse,
    d4_vectors,
    displacement_channel,
    element_index,
    TARGETS,
    tilt_table,
    tilt_vectors,
)


def test_channel_names_and_indices():
    assert DISPLACEMENT_CHANNELS == ("A_dx", "A_dy", "A_dz", "B_dx", "B_dy", "B_dz", "O_dx", "O_dy", "O_dz")
    for i, name in enumerate(DISPLACEMENT_CHANNELS):
        sub, comp = name.split("_")
        assert displacement_channel(sub, comp) == i
    assert column_channel("O") == 2
    # a transpose swaps dx and dy of every sublattice, dz stays
    assert SWAP_XY.tolist() == [1, 0, 2, 4, 3, 5, 7, 6, 8]
    assert [element_index(e) for e in ELEMENTS] == list(range(8))


def test_config_targets_are_the_layout_targets():
    import typing

    from stemnet.config import Target

    assert typing.get_args(Target) == TARGETS == ("potential", "displacement", "tilt")


def test_tilt_gather_table_is_tilt_vectors():
    t = np.array([[1.0, 2.0, 3.0], [-0.5, 4.0, 0.25]])
    for e in ELEMENTS:
        source, sign = tilt_table(e)
        np.testing.assert_array_equal(t[:, source] * sign, tilt_vectors(t, e))


@pytest.mark.parametrize("origin", [0.5, 0.0])
def test_closed_form_inverse_undoes_every_symmetry(origin):
    rng = np.random.default_rng(0)
    scalar = rng.normal(size=(5, 5))
    field = rng.normal(size=(5, 5, 9))
    inverses = set()
    for g in ELEMENTS:
        h = d4_inverse(g)
        inverses.add(h)
        back = d4_array(d4_array(scalar, g, origin=origin), h, origin=origin)
        np.testing.assert_array_equal(back, scalar)
        moved = d4_vectors(d4_array(field, g, axes=(0, 1), origin=origin), g)
        np.testing.assert_array_equal(d4_vectors(d4_array(moved, h, axes=(0, 1), origin=origin), h), field)
        if g != (0, 0, 0):  # only the identity leaves a generic map unchanged
            assert not np.array_equal(d4_array(scalar, g, origin=origin), scalar)
    assert inverses == set(ELEMENTS)


def test_rot90_turns_vectors_counter_clockwise():
    """np.rot90 is (transpose, flip y); (dx, dy) -> (dy, -dx) and its inverse is rot270."""
    d = np.zeros((1, 1, 9))
    d[..., displacement_channel("B", "dx")] = 1.0
    out = d4_vectors(d, (1, 1, 0))
    assert out[0, 0, displacement_channel("B", "dy")] == -1.0 and out[0, 0, displacement_channel("B", "dx")] == 0
    np.testing.assert_array_equal(d4_array(np.arange(9).reshape(3, 3), (1, 1, 0)), np.rot90(np.arange(9).reshape(3, 3)))
    assert d4_inverse((1, 1, 0)) == (1, 0, 1)


def test_no_module_under_stemnet_imports_simulation_or_abtem():
    """The README's rule, checked: importing every stemnet module loads neither abTEM nor
    ``simulation`` (the CLI imports them only inside the commands that simulate)."""
    import subprocess
    import sys

    code = ("import pkgutil, sys, stemnet\n"
            "for m in pkgutil.walk_packages(stemnet.__path__, 'stemnet.'):\n"
            "    __import__(m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('abtem', 'simulation'))\n"
            "print(len(list(pkgutil.walk_packages(stemnet.__path__, 'stemnet.'))), bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-1000:]
    count, bad = out.stdout.split(" ", 1)
    assert int(count) > 40 and bad.strip() == "[]"
