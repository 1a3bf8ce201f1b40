"""Importing PyTorch weights (torchvision encoders, the TSAV checkpoint, the authors' fusion model).

  torch_checkpoint  a .pt/.pth file -> {name: float32 array} (the only place torch is imported)
  name_maps         which PyTorch key becomes which `IACAModel` variable, per checkpoint kind
  state_dict        applies a name map, shapes checked against our modules
  convert           file -> converted-weights directory, and the command line
                    (`python -m iaca_jax.conversion`)

Training and evaluation never import this package: they read converted weights with the torch-free
`iaca_jax.pretrained`.
"""
