"""Stateless seeds are reproducible; bad seeds are refused."""

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import seeds  # pylint: disable=wrong-import-position


def test_same_seed_same_draws():
    for s in (0, 7, [3, 4], np.array([5, 6])):
        a = tf.random.stateless_normal([4], seeds.stateless(s)).numpy()
        b = tf.random.stateless_normal([4], seeds.stateless(s)).numpy()
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(seeds.split(3, 4).numpy(), seeds.split(3, 4).numpy())
    assert len({tuple(r) for r in seeds.split(3, 4).numpy()}) == 4
    assert not np.array_equal(seeds.fold_in(3, 1).numpy(), seeds.fold_in(3, 2).numpy())


@pytest.mark.parametrize("bad, err", [(None, TypeError), (-1, ValueError),
                                      (True, TypeError), ([1, 2, 3], ValueError),
                                      (2**31, ValueError), ([0.5, 1.0], ValueError)])
def test_bad_seeds(bad, err):
    with pytest.raises(err, match="seed"):
        seeds.stateless(bad)
