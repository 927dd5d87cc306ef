"""The zoo tier: every test here is marked ``zoo`` and may import ``zoo_models``."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("monai")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/zoo/" in str(item.fspath):
            item.add_marker(pytest.mark.zoo)
