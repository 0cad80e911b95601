"""DiffuMask baseline (ICCV 2023): masks from Stable Diffusion's cross-attention maps.

    python -m inference.diffumask --config configs/diffumask/toy.yaml

attention (capture and aggregation), masks (threshold, dense CRF, adaptive gamma), affinity
(random walk; colour or learned AffinityNet affinities), refine (masks of staged pairs in a CPU
worker pool), noise (k-fold noise learning, streamed from disk), mosaic, prompts, generate
(settings, checks, one batch's images and maps, the stage between passes; the loop over the
passes is ``inference/diffumask.py``), data (reading a synthetic set back, header checks).
"""
