"""The logic of each job (train tokenizer, cache latents, train generator, sample, evaluate) and the shared
training kit:

- `pipelines.training`: accelerator set-up, seeding, optimiser factory, warmup, clipping, non-finite guard,
  per-time-bucket losses.
- `pipelines.ema`: fp32 EMA of weights.
- `pipelines.checkpoints`: atomic, checksummed resume checkpoints (`CheckpointManager`).
- `pipelines.logging`: tqdm + JSONL + accelerate trackers (`MetricsLogger`).

Nothing is imported here so that `import pipelines.<job>` (and each script's `--help`) stays fast.
"""
