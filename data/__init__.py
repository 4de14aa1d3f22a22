"""Image sources, transforms and latent shards (see DESIGN.md, `data/` row)."""
from data.sources import IMAGE_SOURCES, build_image_dataset

__all__ = ["IMAGE_SOURCES", "build_image_dataset"]
