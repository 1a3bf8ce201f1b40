"""The paper setting on one or more GPUs: bf16 compute (parameters stay float32), the paper's global
batch of 64 over every device, the plain XLA kernels.

Use: python train.py --config configs/gpu.py --workdir runs/paper_gpu \
       --config.dataset.data_dir=/data/tfds --config.pretrained=/ckpt/tsav_converted
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model.dtype = 'bfloat16'
  config.model.kernels = 'xla'
  config.dataset.batch_size = 64  # global: 64 / devices sequences of 16 clips per GPU
  config.dataset.prefetch_batches = 2
  return config
