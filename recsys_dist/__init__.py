"""recsys-dist: distributed training of diffusion-based sequential recommenders.

Sparse item tables live in TorchRec (sharded across ranks), dense networks train under
DeepSpeed, data streams from WebDataset shards over fsspec, and evaluation ranks the full
item catalog exactly. See README.md for the map of the package.
"""

__version__ = "0.1.0"
