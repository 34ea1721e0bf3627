"""The 2D-aware hourglass transformer prior of sundae (a `sundae.priors` backend).

`sundae_hourglass.plugin:backend` is the entry point; `sundae_hourglass.model` holds
the network and imports torch.
"""
