"""One shape parser (distbatch.shapes) for probe-batch, bench and the Python API."""
import pytest

from distbatch.errors import ParameterError
from distbatch.cli import probe
from distbatch.measure import bench
from distbatch.shapes import parse_shape


@pytest.mark.parametrize("value, shape", [
    ("40", (40,)), ("32x32x3", (32, 32, 3)), ("32,32,3", (32, 32, 3)), ("28X28", (28, 28)),
    (" 8x8 ", (8, 8)), ((32, 32, 3), (32, 32, 3)), ([40], (40,)), (40, (40,)),
])
def test_both_spellings_everywhere(value, shape):
    assert parse_shape(value) == shape
    if isinstance(value, str):
        assert bench.parse_input_shape(value) == probe.parse_shape(value) == shape


@pytest.mark.parametrize("value", ["", "32x", "a", "32x0x3", "-4", "3,,3", (3, 2.5), (True,), ()])
def test_bad_shapes_name_the_parameter_and_the_cli_the_flag(value):
    with pytest.raises(ParameterError, match="^input_shape ") as err:
        parse_shape(value)
    assert str(err.value.for_flags()).startswith("--input-shape ")
