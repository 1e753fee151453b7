"""Models: backbone loading, the control branch, the LightningModule and sampling.

Kept import-light: import the submodules you need (``cn_lightning.models.module`` pulls in
Lightning and diffusers).
"""
