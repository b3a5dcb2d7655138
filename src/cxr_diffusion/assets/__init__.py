"""External assets (pretrained CLIP, SD VAE, published ELIXR-B, evaluation weights): which the params need
(catalog), how they are downloaded (download), recorded (manifest) and checked (status), and the two user
commands built on them: `cxr-diffusion fetch` (fetch) and `cxr-diffusion doctor` (doctor).

Nothing here runs at stage time: stages only read what fetch placed.
"""
