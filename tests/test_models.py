"""The paper's reference architectures."""

import pytest

from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position


def test_mlp_and_cnn_shapes_and_parameter_counts():
    net = Network.from_keras(models.mlp((28, 28, 1), 10, (512, 512)))
    assert net.num_params == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    cnn = Network.from_keras(models.cnn((28, 28, 1), 10, (32, 64)))
    # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: 4*4*64 features.
    assert cnn.param_shapes == ((5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,),
                                (1024, 10), (10,))
    assert Network.from_keras(models.mlp((2,), 2, (8,))).param_shapes == (
        (2, 8), (8,), (8, 2), (2,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        models.mlp((2,), 2, ())
    with pytest.raises(ValueError, match="num_classes"):
        models.mlp((2,), 1)
    with pytest.raises(ValueError, match="input_shape"):
        models.cnn((28, 28), 10)


def test_argument_messages_follow_the_shared_checks():
    with pytest.raises(ValueError, match=r"hidden\[1\] must be >= 1, got 0"):
        models.mlp((2,), 2, (4, 0))
    with pytest.raises(TypeError, match="num_classes must be an int, got 2.5"):
        models.cnn((8, 8, 1), 2.5)
    with pytest.raises(TypeError, match="filters must be a sequence of ints"):
        models.cnn((8, 8, 1), 2, filters=4)
    assert len(models.cnn((8, 8, 1), 2, filters=(2,), hidden=None).layers) == 4
