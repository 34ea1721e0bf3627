"""sundae's built-in VQ-GAN autoencoder backend (taming-transformers compatible).

Importing this package stays light (no torch); the network lives in
`sundae_vqgan.model`, the losses in `sundae_vqgan.losses` and `sundae_vqgan.vgg`, the
safe checkpoint importer in `sundae_vqgan.taming`.
"""

from sundae_vqgan.config import VQGANConfig

__all__ = ["VQGANConfig"]
