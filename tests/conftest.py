"""Test-wide settings: 8 fake CPU devices (for the sharded-step tests), TF kept quiet and off accelerators."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


import fcntl  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import types  # noqa: E402

import librosa  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import tiny as tiny_config  # noqa: E402
from data import build  # noqa: E402
from data.synthetic_av import generate  # noqa: E402
from iaca_jax import feature_cache  # noqa: E402


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
  """The tiny synthetic set, generated and built once per session (shared by xdist workers)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # shared by all workers of this session
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


def make_config(data_dir, features_dir=''):
  """configs/tiny.py reading the tiny set (and its cached features)."""
  config = tiny_config.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.features_dir = features_dir
  return config


@pytest.fixture(scope='session')
def cached(tiny):
  """Cached tiny-encoder features of the tiny set, written once per session."""
  features_dir = str(tiny.root / 'features')
  with open(features_dir + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(features_dir, 'dataset_info.json')):
      feature_cache.cache_features(make_config(tiny.data_dir, features_dir))
  return make_config(tiny.data_dir, features_dir)


def librosa_log_mel(y, sr):
  """The normalised log-mel of docs/DESIGN.md §2, written directly with librosa's public functions
  (the independent reference of the mel and input-pipeline tests)."""
  s = librosa.feature.melspectrogram(
    y=y.astype(np.float64),
    sr=sr,
    n_fft=1024,
    hop_length=441,
    win_length=882,
    window='hann',
    center=True,
    pad_mode='reflect',
    power=2.0,
    n_mels=64,
    fmin=0.0,
    fmax=sr / 2,
    htk=True,
    norm=None,
  )
  db = librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=80.0)
  return (db + 14.8) / 19.895
