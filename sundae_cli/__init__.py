"""sundae: two-stage discrete image generation with SUNDAE priors."""

__version__ = "0.1.0"
