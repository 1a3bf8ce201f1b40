"""The paper setting on a Cloud TPU slice: bf16 compute (parameters stay float32), cached encoder
features, the plain XLA kernels, one process per host (`cluster.distributed`: JAX detects the TPU's
coordinator). The global batch is 64 as in the paper; on a large slice raise it with the learning rate
(docs/SCALING.md) so that every chip gets at least one sequence.

Use (on every host of the slice): python train.py --config configs/tpu.py --workdir gs://bucket/runs/paper \
       --config.dataset.data_dir=gs://bucket/tfds --config.dataset.features_dir=gs://bucket/features
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model.dtype = 'bfloat16'
  config.model.kernels = 'xla'
  config.dataset.features_dir = 'features'  # python cache_features.py writes them (frozen encoders)
  config.dataset.batch_size = 64
  config.cluster.distributed = True
  return config
