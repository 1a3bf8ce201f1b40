"""The config files: every one loads with the groups of configs/default.py, its optional fields are
None until a `--config.` override sets them, its model settings build a model; a run's config.json
of the old flat layout reads back in the grouped one."""

import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs import default, gpu, synthetic_demo, tiny, tpu
from iaca_jax import cli, models, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'default': default, 'gpu': gpu, 'tpu': tpu, 'synthetic_demo': synthetic_demo, 'tiny': tiny}
GROUPS = ('dataset', 'model', 'optimizer', 'schedule', 'training', 'evaluation', 'replicas', 'cluster')


def parse(name: str, *overrides: str):
  """The config file `name` as an entry point gets it (locked) with `--config.` overrides."""
  argv = ['prog', f'--config={os.path.join(ROOT, "configs", name + ".py")}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', lock_config=True, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_every_config_file_has_the_groups_and_builds_its_model(name):
  config = CONFIGS[name].get_config()
  assert set(config.keys()) == {'seed', 'pretrained', *GROUPS}
  assert set(config.keys()) == set(default.get_config().keys())
  for group in GROUPS:
    assert set(config[group].keys()) == set(default.get_config()[group].keys()), group
  assert config.pretrained is None and config.training.max_steps is None
  assert config.cluster.coordinator_address is None and config.cluster.num_processes is None
  assert config.cluster.process_id is None
  assert config.dataset.batch_size > 0 and config.replicas.count == 1
  model = models.model_from_config(config.model)
  assert model.features == config.model.features and model.gating == config.model.gating


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_placeholder_fields_take_overrides_from_the_command_line(name):
  config = parse(
    name,
    '--config.training.max_steps=3',
    '--config.pretrained=/ckpt/converted',
    '--config.dataset.features_dir=/data/features',
    '--config.cluster.coordinator_address=10.0.0.1:8476',
    '--config.cluster.num_processes=2',
    '--config.cluster.process_id=1',
    '--config.replicas.count=2',
    '--config.model.stage2_temperature=0.5',
  )
  assert config.training.max_steps == 3 and config.pretrained == '/ckpt/converted'
  assert config.dataset.features_dir == '/data/features'
  assert config.cluster.coordinator_address == '10.0.0.1:8476'
  assert (config.cluster.num_processes, config.cluster.process_id, config.replicas.count) == (2, 1, 2)
  assert config.model.stage2_temperature == 0.5
  config.training.max_steps = None  # back to unset
  with pytest.raises(TypeError):
    config.training.max_steps = 'three'
  with pytest.raises(AttributeError):  # locked: the old flat keys are gone
    config.max_steps = 3


def old_flat_layout(config) -> dict:
  """`config` (grouped) as train.py recorded it in config.json before the configs were grouped: flat
  keys, and '' / -1 / 0 for unset values."""
  dataset = config.dataset.to_dict()
  batch_size, prefetch_batches = dataset.pop('batch_size'), dataset.pop('prefetch_batches')
  dataset['features_dir'] = dataset['features_dir'] or ''
  training, cluster = config.training, config.cluster
  return json.loads(
    json.dumps(
      {
        'seed': config.seed,
        'replicas': config.replicas.count,
        'first_replica': config.replicas.first,
        'shard_replicas': config.replicas.shard,
        'dataset': dataset,
        'model': config.model.to_dict(),
        'pretrained': config.pretrained or '',
        'batch_size': batch_size,
        'num_epochs': training.num_epochs,
        'learning_rate': config.optimizer.learning_rate,
        'weight_decay': config.optimizer.weight_decay,
        'lr_decay': config.schedule.decay,
        'lr_decay_every_epochs': config.schedule.decay_every_epochs,
        'lr_decay_start_epoch': config.schedule.decay_start_epoch,
        'max_steps': -1 if training.max_steps is None else training.max_steps,
        'log_every_steps': training.log_every_steps,
        'eval_every_epochs': config.evaluation.every_epochs,
        'checkpoint_every_steps': training.checkpoint_every_steps,
        'keep_checkpoints': training.keep_checkpoints,
        'distributed': cluster.distributed,
        'coordinator_address': cluster.coordinator_address or '',
        'num_processes': cluster.num_processes or 0,
        'process_id': -1 if cluster.process_id is None else cluster.process_id,
        'distributed_timeout_s': cluster.timeout_s,
        'prefetch_batches': prefetch_batches,
        'max_steps_in_flight': training.max_steps_in_flight,
      }
    )
  )


def test_an_old_flat_run_config_reads_back_in_the_grouped_layout(tmp_path):
  grouped = tiny.get_config()
  dataset = grouped.dataset.to_dict()
  del dataset['batch_size'], dataset['prefetch_batches']
  flat = {  # configs/tiny.py's config.json as train.py wrote it before the configs were grouped
    'seed': 0,
    'replicas': 1,
    'first_replica': 0,
    'shard_replicas': False,
    'dataset': dict(dataset, jitter=list(dataset['jitter']), features_dir=''),
    'model': grouped.model.to_dict(),
    'pretrained': '',
    'batch_size': 8,
    'num_epochs': 2,
    'learning_rate': 2e-3,
    'weight_decay': 1e-5,
    'lr_decay': 0.8,
    'lr_decay_every_epochs': 2,
    'lr_decay_start_epoch': 5,
    'max_steps': -1,
    'log_every_steps': 1,
    'eval_every_epochs': 1,
    'checkpoint_every_steps': 2,
    'keep_checkpoints': 2,
    'distributed': False,
    'coordinator_address': '',
    'num_processes': 0,
    'process_id': -1,
    'distributed_timeout_s': 300,
    'prefetch_batches': 2,
    'max_steps_in_flight': 2,
  }
  assert flat == old_flat_layout(grouped)
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(flat, indent=1))
  config = run_config.read(str(path))
  assert json.loads(config.to_json()) == json.loads(grouped.to_json())
  assert config.replicas.count == 1 and config.dataset.features_dir is None and config.pretrained is None
  assert config.training.max_steps is None and config.cluster.process_id is None

  set_values = dict(flat, replicas=3, first_replica=2, max_steps=7, pretrained='/ckpt', process_id=0)
  set_values['dataset'] = dict(flat['dataset'], features_dir='/features')
  config = run_config.from_dict(set_values)
  assert (config.replicas.count, config.replicas.first, config.training.max_steps) == (3, 2, 7)
  assert config.pretrained == '/ckpt' and config.dataset.features_dir == '/features'
  assert config.cluster.process_id == 0 and config.cluster.num_processes is None


def test_a_grouped_run_config_reads_back_as_written(tmp_path):
  config = tiny.get_config()
  config.training.max_steps, config.replicas.count = 5, 2
  path = tmp_path / 'config.json'
  path.write_text(config.to_json(indent=1))
  assert json.loads(run_config.read(str(path)).to_json()) == json.loads(config.to_json())


def test_a_flat_layout_override_gets_its_new_name(capsys):
  with pytest.raises(SystemExit) as stop:
    cli.parse_flags(['train.py', '--config.training.num_epochs=2', '--config.max_steps=3'])
  assert stop.value.code == 2
  assert capsys.readouterr().err.strip() == (
    'error: --config.max_steps is now --config.training.max_steps (the config is grouped: configs/default.py)'
  )


def test_a_user_error_without_text_is_named_by_its_type(capsys):
  def fails():
    raise OSError()

  with pytest.raises(SystemExit) as stop:
    cli.run_reporting_user_errors(fails)
  assert stop.value.code == 1 and capsys.readouterr().err.strip() == 'error: OSError'
