"""cn_lightning: train ControlNets at any scale with Lightning, diffusers, WebDataset and Hydra."""

__version__ = "0.1.0"
