"""Fixed-seed fuzzing of the user-file readers (see tests/fuzz_readers.py; the long run is
``python -m bench.fuzz_readers``)."""
import pytest

from tests.fuzz_readers import PROPERTIES

BUDGET = {"config YAML": 60}  # parsing builds the whole argument parser: slower per example


@pytest.mark.reliability(fault='Random and adversarial files (hypothesis, fixed seed) for each reader',
                         outcome='parsed, or a format error naming the file; nothing written')
@pytest.mark.parametrize("reader", list(PROPERTIES))
def test_reader_parses_or_names_the_file(reader):
    PROPERTIES[reader](BUDGET.get(reader, 300))()
