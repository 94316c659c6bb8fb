"""Fixtures of the robustness tests: a tiny dataset and its configs."""
import pytest
from robustness_utils import IMAGE_SIZE, write_tiny_config

from balanced_l1_plugin.datasets.synthetic import make_synthetic_coco


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory) -> str:
    """A synthetic COCO dataset of 16 training and 4 validation images."""
    root = str(tmp_path_factory.mktemp('synthetic'))
    make_synthetic_coco(
        root,
        num_train=16,
        num_val=4,
        image_size=IMAGE_SIZE,
        seed=0,
        progress=False)
    return root


@pytest.fixture
def tiny_config(synthetic_root, tmp_path):
    """Factory: ``tiny_config(name, **options)`` writes a config file."""

    def make(name: str = 'tiny', **options) -> str:
        return write_tiny_config(
            str(tmp_path / f'{name}.py'),
            synthetic_root,
            outfile_prefix=str(tmp_path / f'{name}_results'),
            **options)

    return make


@pytest.fixture(autouse=True)
def not_distributed(monkeypatch):
    """Checks read the data only in rank 0; these tests are rank 0."""
    for name in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        monkeypatch.delenv(name, raising=False)
