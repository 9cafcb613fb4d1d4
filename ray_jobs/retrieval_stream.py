"""The retrieval part of ``ray_jobs.evaluate`` (Med3DVLM Table 1): a contrastive checkpoint embeds the
split's volumes and reports on a Ray Data actor pool, one volume shard per batch, like the job's
request stream reads them; the recalls are computed from the embeddings on the driver."""
from __future__ import annotations

from dataclasses import dataclass, field

from components.config import ConfigError
from components.evaluation.retrieval import PairEmbedder, evaluate_retrieval
from components.metrics.retrieval import TEST_SIZES, TOP_K


@dataclass
class RetrievalSection:
    """Image-text retrieval R@K with a contrastive (SigLIP / CLIP) checkpoint."""

    model: str | None = None
    """Contrastive model folder, checkpoint or run folder (newest checkpoint) written by
    ``ray_jobs.pretrain_contrastive``, local or s3://; null = no retrieval."""
    sizes: list[int] = field(default_factory=lambda: list(TEST_SIZES))
    """Test sizes N (the first N pairs); sizes above the split's number of pairs are listed as skipped."""
    ks: list[int] = field(default_factory=lambda: list(TOP_K))
    """Recall cut-offs K."""
    batch_size: int = 8
    """Volumes (and reports) embedded per forward pass."""
    concurrency: int = 1
    """Embedding actors; each loads the checkpoint."""
    cpus: float = 1.0
    """CPUs per embedding actor (also its torch thread count, at least 1)."""
    gpus: float = 0.0
    """GPUs per embedding actor; > 0 embeds on CUDA."""

    def __post_init__(self):
        for name in ("sizes", "ks"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{name}: must list at least one value")
            for i, value in enumerate(values):
                if value < 1:
                    raise ConfigError(f"{name}[{i}]: must be >= 1, got {value}")
        for name in ("batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


class EmbedPairsFromShards:
    """Ray Data UDF: a volume shard file -> the embeddings of the pairs whose volume it holds."""

    def __init__(self, checkpoint: str, data_path: str, reports: dict[str, str], storage: dict,
                 batch_size: int, torch_threads: int, use_gpu: bool):
        import torch

        torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.embedder = PairEmbedder(checkpoint, storage, device, batch_size)
        self.data_path, self.reports, self.storage = data_path, reports, storage

    def __call__(self, batch: dict) -> dict:
        # every shard holds a wanted volume (volume_shards picks them), so the output is never empty
        return self.embedder.shard(self.data_path, batch["path"][0], self.reports, self.storage)


def embed_split(section: RetrievalSection, data_path: str, split: str, dataset: str, storage: dict) -> dict:
    """:func:`evaluate_retrieval` of one split with the embedding on a Ray Data actor pool."""
    import ray
    from ray.data import ActorPoolStrategy

    def embed_shards(paths, reports):
        shards = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        gpus = {"num_gpus": section.gpus} if section.gpus > 0 else {}
        embedded = shards.map_batches(EmbedPairsFromShards, fn_constructor_kwargs=dict(
            checkpoint=section.model, data_path=data_path, reports=dict(reports), storage=storage,
            batch_size=section.batch_size, torch_threads=max(1, int(section.cpus)), use_gpu=section.gpus > 0),
            batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=section.concurrency),
            num_cpus=section.cpus, **gpus)
        return embedded.iter_batches(batch_size=None, batch_format="numpy")

    return evaluate_retrieval(section.model, data_path, split, section.sizes, section.ks, section.batch_size,
                              dataset, storage, embed_shards=embed_shards)
