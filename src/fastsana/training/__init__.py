"""Training: data pipeline (this package's modules are imported explicitly, nothing here).

- ``captions``: caption records and the CLIP-score-weighted caption choice.
- ``buckets``: fitting images to aspect-ratio buckets; bucket batch sampler; stream bucketing.
- ``data``: the image-folder dataset (``metadata.jsonl``) and the batch ``collate``.
- ``shards``: streaming batches from WebDataset tar shards.
- ``cache``: writing and reading cached DC-AE latents and text embeddings.
"""
