"""Training (modules are imported explicitly; nothing is imported here).

The loop and what it trains:
- ``trainer``: the training loop (steps, logging, checkpoints, validation, export).
- ``dit_task`` / ``objectives``: the rectified-flow DiT objective (and LoRA, via ``lora``).
- ``ae_task`` / ``ae_losses``: the DC-AE on random crops (L1, SSIM, optional patch GAN).
- ``parts``, ``model_setup``, ``components``: the trained network with its optimizer and EMA,
  and the frozen autoencoder / text encoder around it.
- ``optim``, ``ema``: optimizers, learning-rate schedule, EMA weights.
- ``checkpointing``, ``distributed``: atomic exact-resume checkpoints; DDP / FSDP2.
- ``config``, ``config_parse``: the typed YAML configuration and ``--set`` overrides.
- ``validation``, ``metrics``, ``export``: grids, loss logs and plots, exported pipelines.

Data:
- ``data``: the image-folder dataset (``metadata.jsonl``) and the batch ``collate``.
- ``captions``: caption records and the CLIP-score-weighted caption choice.
- ``buckets``: fitting images to aspect-ratio buckets; bucket batch sampler; stream bucketing.
- ``shards``: streaming batches from WebDataset tar shards.
- ``cache`` / ``precompute``: cached DC-AE latents and text embeddings (``fastsana cache``).
- ``loader``: endless batch streams whose position a checkpoint saves.
- ``cli``: ``fastsana train``, ``fastsana cache``, ``fastsana export``.
"""
