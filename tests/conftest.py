"""Test-wide settings: 8 fake CPU devices (for the sharded-step tests), TF kept quiet and off accelerators."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import fcntl  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
  """The tiny synthetic set, generated and built once per session (shared by xdist workers)."""
  from data import build
  from data.synthetic_av import generate
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent                       # shared by all workers of this session
  root = base / 'iaca_data_tiny'
  with open(str(root) + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / 'DONE').exists():
      shutil.rmtree(root, ignore_errors=True)
      generate.generate(str(root / 'raw'), generate.SIZES['tiny'], seed=0)
      build.build('synthetic_av', str(root / 'raw'), str(root / 'tfds'), num_shards=3)
      (root / 'DONE').touch()
  raw = str(root / 'raw')
  with open(os.path.join(raw, 'corruptions.json')) as f:
    side = json.load(f)['videos']
  return types.SimpleNamespace(raw=raw, data_dir=str(root / 'tfds'), side=side, root=root)
