"""The paper setting (docs/DESIGN.md §3-4): RJCA + IACA, R(2+1)D-18 and ResNet-18 encoders, batch 64, AdamW.

Use: python train.py --config configs/default.py --workdir runs/paper \
       --config.dataset.data_dir=/data/tfds --config.pretrained=/ckpt/tsav_converted
Every field can be overridden with --config.<key>=<value>; an unknown key is an error.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0  # data order; replica r's init and dropout seeds are seed + 2r, seed + 2r + 1
  config.replicas = 1  # K independent models in one step (iaca_jax/replicas.py)
  config.first_replica = 0  # index r of the first replica (K runs of 1 replica equal one run of K)
  # Replicas over devices: gcd(K, devices) device groups, each with its own replicas and the whole batch
  # (mesh ('replica', 'data'); one process). False: every device holds every replica, the batch sharded.
  config.shard_replicas = False

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'aff_wild2'  # tfds name of the shards (synthetic_av or aff_wild2)
  config.dataset.data_dir = 'tfds_data'  # tfds data_dir that holds <name>/<version>/
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  config.dataset.features_dir = ''  # cached encoder features (python cache_features.py); '' = online encoders
  config.dataset.features_dtype = 'float32'  # how cache_features.py stores them: float32 or float16 (half)
  config.dataset.jitter = (0.8, 1.2)  # per-clip brightness/contrast factors (raw-input training); ()=off
  config.dataset.shuffle_buffer = 1024

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
  config.model.stage2 = placeholder(str)  # gating='iaca' only: modality (None) | sum | iteration | raw
  config.model.gate_temperature = 0.1
  config.model.stage2_temperature = placeholder(float)  # None: the same as gate_temperature
  config.model.head_hidden = 128
  config.model.head_dropout = 0.6
  config.model.torch_layout = False  # True to run the authors' fusion weights (docs/DESIGN.md §3.4)
  config.model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU (parameters stay fp32)
  # How the model is computed (same values): auto = the CPU kernels on CPU devices, else xla; xla; cpu
  # (iaca_jax/kernel_choice.py, docs/PERFORMANCE.md).
  config.model.kernels = 'auto'

  config.pretrained = ''  # converted PyTorch weights (python -m iaca_jax.conversion)
  config.batch_size = 64  # global batch of 16-clip sequences
  config.num_epochs = 100
  config.learning_rate = 1e-3
  config.weight_decay = 1e-5
  config.lr_decay = 0.8  # x0.8 ...
  config.lr_decay_every_epochs = 2  # ... every 2 epochs ...
  config.lr_decay_start_epoch = 5  # ... after epoch 5
  config.max_steps = -1  # stop early after this many steps (-1: num_epochs)

  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 500  # the latest state is also saved after every evaluation
  config.keep_checkpoints = 2  # latest checkpoints kept; the best one is kept apart
  config.distributed = False  # join a multi-process run (iaca_jax/distributed.py, docs/SCALING.md)
  config.coordinator_address = ''  # process 0's host:port; '' = $JAX_COORDINATOR_ADDRESS or auto-detect
  config.num_processes = 0  # 0 = $JAX_NUM_PROCESSES or auto-detect (Cloud TPU, SLURM, ...)
  config.process_id = -1  # -1 = $JAX_PROCESS_ID or auto-detect
  config.distributed_timeout_s = 300  # joining, a silent (dead) process, the shutdown barrier
  config.prefetch_batches = 2  # batches staged on the devices ahead of the step
  config.max_steps_in_flight = 2  # dispatched, unfinished steps the host may queue (0: no bound)
  return config
