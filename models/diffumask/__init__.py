"""DiffuMask baseline (ICCV 2023): masks from Stable Diffusion's cross-attention maps.

    python -m inference.diffumask --config configs/diffumask/toy.yaml

attention (capture and aggregation), masks (threshold, dense CRF, adaptive gamma), affinity
(random walk; colour or learned AffinityNet affinities), noise (k-fold noise learning), mosaic,
prompts, generate (``generate_diffumask_dataset``), data (reading a synthetic set back).
"""
