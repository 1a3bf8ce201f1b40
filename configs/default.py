"""The paper setting (docs/DESIGN.md §3-4): RJCA + IACA, R(2+1)D-18 and ResNet-18 encoders, batch 64, AdamW.

Use: python train.py --config configs/default.py --workdir runs/paper \
       --config.dataset.data_dir=/data/tfds --config.pretrained=/ckpt/tsav_converted
Groups: dataset (the input), model (the model's keyword arguments), optimizer, schedule, training (the
loop), evaluation, replicas, cluster. Every field can be overridden with --config.<group>.<key>=<value>
(--config.seed, --config.pretrained at the top); an unknown key is an error. Unset optional fields are
None (placeholders: an override gives them a value of their type).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0  # data order; replica r's init and dropout seeds are seed + 2r, seed + 2r + 1
  config.pretrained = placeholder(str)  # converted PyTorch weights (python -m iaca_jax.conversion) or None

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'aff_wild2'  # tfds name of the shards (synthetic_av or aff_wild2)
  config.dataset.data_dir = 'tfds_data'  # tfds data_dir that holds <name>/<version>/
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  # Cached encoder features (python cache_features.py); None: the encoders run online.
  config.dataset.features_dir = placeholder(str)
  config.dataset.features_dtype = 'float32'  # how cache_features.py stores them: float32 or float16 (half)
  config.dataset.jitter = (0.8, 1.2)  # per-clip brightness/contrast factors (raw-input training); ()=off
  config.dataset.shuffle_buffer = 1024
  config.dataset.batch_size = 64  # global batch of 16-clip sequences
  config.dataset.prefetch_batches = 2  # batches staged on the devices ahead of the step

  config.model = ml_collections.ConfigDict()
  config.model.encoder_width = 1.0  # 1.0 = torchvision R(2+1)D-18 / ResNet-18
  config.model.encoder_blocks_per_stage = 2
  config.model.freeze_encoders = True  # the paper freezes its pretrained encoders
  config.model.face_size = placeholder(int)  # resize faces before the encoder; None = as stored (112)
  config.model.features = 512
  config.model.lstm_hidden = 256
  config.model.temporal_dropout = 0.1
  config.model.cross_attention = 'rjca'  # none | ca | jca | rjca
  config.model.rjca_iterations = 2
  config.model.cross_attention_dropout = 0.6
  config.model.gating = 'iaca'  # none | stage1 | iaca
  config.model.stage2 = placeholder(str)  # gating='iaca' only: modality (None) | mlp | sum | iteration | raw
  config.model.gate_temperature = 0.1
  config.model.stage2_temperature = placeholder(float)  # None: the same as gate_temperature
  config.model.head_hidden = 128
  config.model.head_dropout = 0.6
  config.model.torch_layout = False  # True to run the authors' fusion weights (docs/DESIGN.md §3.4)
  config.model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU (parameters stay fp32)
  # How the model is computed (same values): auto = the CPU kernels on CPU devices, else xla; xla; cpu
  # (iaca_jax/kernel_choice.py, docs/PERFORMANCE.md).
  config.model.kernels = 'auto'

  config.optimizer = ml_collections.ConfigDict()  # AdamW
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-5

  config.schedule = ml_collections.ConfigDict()  # of the learning rate
  config.schedule.decay = 0.8  # x0.8 ...
  config.schedule.decay_every_epochs = 2  # ... every 2 epochs ...
  config.schedule.decay_start_epoch = 5  # ... after epoch 5

  config.training = ml_collections.ConfigDict()  # the loop
  config.training.num_epochs = 100
  config.training.max_steps = placeholder(int)  # stop early after this many steps; None = num_epochs
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500  # the latest state is also saved after every evaluation
  config.training.keep_checkpoints = 2  # latest checkpoints kept; the best one is kept apart
  config.training.max_steps_in_flight = 2  # dispatched, unfinished steps the host may queue (0: no bound)

  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.every_epochs = 1  # validation (and the best checkpoint) every that many epochs

  config.replicas = ml_collections.ConfigDict()  # K independent models in one step (iaca_jax/replicas.py)
  config.replicas.count = 1  # K
  config.replicas.first = 0  # index r of the first replica (K runs of 1 replica equal one run of K)
  # Replicas over devices: gcd(K, devices) device groups, each with its own replicas and the whole batch
  # (mesh ('replica', 'data'); on several hosts too). False: every device holds every replica, the batch
  # sharded.
  config.replicas.shard = False

  config.cluster = ml_collections.ConfigDict()  # several processes (iaca_jax/distributed.py, docs/SCALING.md)
  config.cluster.distributed = False  # join a multi-process run
  # Unset (None): from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, or auto-detected
  # (Cloud TPU, SLURM, ...).
  config.cluster.coordinator_address = placeholder(str)  # process 0's host:port
  config.cluster.num_processes = placeholder(int)
  config.cluster.process_id = placeholder(int)
  config.cluster.timeout_s = 300  # joining, a silent (dead) process, the shutdown barrier
  return config
