"""The smallest setting, for tests: tiny encoders and fusion model, two epochs."""

import ml_collections

from configs import synthetic_demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = synthetic_demo.get_config(arg)
  config.dataset.features_dir = None  # online encoders
  config.dataset.shuffle_buffer = 16
  config.model.encoder_width = 0.0625
  config.model.face_size = 28
  config.model.features = 16
  config.model.lstm_hidden = 8
  config.model.head_hidden = 8
  config.dataset.batch_size = 8
  config.training.num_epochs = 2
  config.training.log_every_steps = 1
  config.training.checkpoint_every_steps = 2
  return config
