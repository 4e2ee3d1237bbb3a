import pytest

from pulid_lab.train.config import pretrain_config
from pulid_lab.train.pretrain import pretrain


@pytest.fixture(scope="session")
def smoke_models(tmp_path_factory):
    """A complete models folder from the smoke profile (seconds of training: shapes, not quality)."""
    out = tmp_path_factory.mktemp("smoke_models")
    report = pretrain(pretrain_config("smoke"), out, progress=False)
    return out, report
