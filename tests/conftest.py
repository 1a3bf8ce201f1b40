"""Test-wide settings: 8 fake CPU devices (for the sharded-step tests), TF kept quiet and off accelerators,
a persistent compilation cache."""

import os
import tempfile

# 8 fake CPU devices; LLVM's optimisations off: the suite's programs are tiny and compiled many times,
# so optimising them cost more than running them (a third of the suite's time). Semantics are XLA's
# either way; what the tests compare runs under the same flags, and the entry points keep the default.
os.environ.setdefault(
  'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Most of the suite's time is XLA compiling the same tiny programs again: in each training run of
# a test (a resumed run is a new Trainer), in each xdist worker and in each subprocess. JAX's
# persistent cache, shared through the environment, compiles each once; its key holds the program,
# the XLA flags and the jax version, so a hit is the same executable.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), f'iaca_jax_test_jit_cache_{os.getuid()}')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(2 << 30))


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
from iaca_jax import feature_cache, runtime, train_lib  # noqa: E402

runtime.configure_process()  # as every entry point's main does, before JAX starts its backends


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


def make_config(data_dir, features_dir=None):
  """configs/tiny.py reading the tiny set (and its cached features)."""
  config = tiny_config.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.features_dir = features_dir
  return config


@pytest.fixture(scope='session')
def cached_features_dir(tiny):
  """Cached tiny-encoder features of the tiny set, written once per session (shared by xdist workers)."""
  features_dir = str(tiny.root / 'features')
  with open(features_dir + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(features_dir, 'dataset_info.json')):
      feature_cache.cache_features(make_config(tiny.data_dir, features_dir))
  return features_dir


@pytest.fixture
def cached(tiny, cached_features_dir):
  """A fresh configs/tiny.py reading the cached features (a test may change it)."""
  return make_config(tiny.data_dir, cached_features_dir)


@pytest.fixture(scope='session')
def one_epoch_run(tiny, cached_features_dir):
  """One epoch of the tiny model on the cached features (8 devices, checkpoints every 3 steps),
  trained once per session for the tests that only read it: (config, workdir, train result)."""
  config = make_config(tiny.data_dir, cached_features_dir)
  training = config.training
  training.num_epochs, training.checkpoint_every_steps, training.log_every_steps = 1, 3, 3
  workdir = tiny.root / 'one_epoch_run'
  with open(str(workdir) + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / 'train_result.json').exists():
      shutil.rmtree(workdir, ignore_errors=True)
      train_lib.train_and_evaluate(config, str(workdir))
  result = json.loads((workdir / 'train_result.json').read_text())
  return types.SimpleNamespace(config=config, workdir=str(workdir), result=result)


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


def pytest_collection_modifyitems(config, items):
  """Tests marked `heavy` first: xdist hands tests out in collection order, so the long ones start
  early, the short ones fill in after them, and the workers finish together."""
  items.sort(key=lambda item: item.get_closest_marker('heavy') is None)
