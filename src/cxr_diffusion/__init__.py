"""cxr-diffusion: synthetic chest X-ray generation research."""

__version__ = "0.1.0"
