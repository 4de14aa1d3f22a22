"""One module per job, each reading top to bottom, over a shared kit:

- jobs: `train_tokenizer` (stage 1), `cache_latents`, `train_generator` (stage 2), `sample`, `evaluate`.
  A job imports the kit and the model/data layers (`tokenizer`, `generator`, `data`), never another job.
- `pipelines.kit`: what more than one job needs: run set-up (`run`), optimiser (`optim`), the training loop
  skeleton and step helpers (`loop`), `ema`, `checkpoints`, `logging`, `precision`, image metrics (`metrics`),
  generation (`generation`), FID (`fid`), the crash-injection hook (`faults`) and the CPU allocator setting
  (`allocator`).
- `pipelines.experiments`: the paper's controlled studies, the throughput benchmark and the offline demo; they
  run jobs, nothing imports them.

Argument parsing lives in `scripts/`. Only `GenerationPipeline` is exported (lazily), so that `import pipelines.<job>` (and each
script's `--help`) stays fast.
"""


def __getattr__(name: str):
    """`from pipelines import GenerationPipeline` works without importing torch for every script's --help."""
    if name == "GenerationPipeline":
        from pipelines.kit.generation import GenerationPipeline

        return GenerationPipeline
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


__all__ = ["GenerationPipeline"]
