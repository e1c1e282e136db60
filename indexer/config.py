"""What a `clipdex index` run is asked to do: one config, passed whole to every stage and engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from encoder import DEFAULT_MAX_PIXELS
from store.ann import AnnConfig
from store.remote import StorageOptions


@dataclass(frozen=True)
class RayConfig:
    """Options of the Ray engine only (the local engine refuses them: indexer/local_engine.py)."""
    address: str | None = None  # None: start a local cluster for the run
    workers: int | None = None  # actors; None: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_worker: float = 1.0  # also each actor's torch, reading and decoding threads
    gpus_per_worker: float = 0.0
    batch_size: int = 256  # jobs per actor call: one fragment each


@dataclass(frozen=True)
class IndexConfig:
    model: str | None = None  # None: the store's model, or ViT-B-32 for a new store
    pretrained: str | None = None
    device: str = "auto"
    precision: str = "fp32"  # encoder.precision.PRECISIONS: how the vectors are computed (recorded by the store)
    batch_size: int | None = None  # images per forward pass; None: 64 on CPU, 256 on CUDA
    workers: int | None = None  # decoding threads; None: one per core, at most 8 (ray: the number of actors)
    readers: int | None = None  # threads reading files; None: as many as decoding threads
    decoder: str = "auto"  # pillow | torchvision | auto (torchvision on CUDA): encoder.feed.make_feed
    captions: tuple[str, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    exact_decode: bool = False  # False: large JPEGs decoded reduced, as far as encoder.reduction allows
    commit_every: int = 1024
    chunk_files: int = 50_000  # files planned and embedded at a time: what a run holds of the library
    ann: AnnConfig = field(default_factory=AnnConfig)
    progress: bool = True
    wait: bool = False  # another writer holds the store: wait for it (False: fail at once, naming it)
    prune: bool = False  # remove the rows of roots that are missing, unreadable or empty
    cross_mounts: bool = False  # also enter file systems mounted below a root (never /proc, /sys and the like)
    engine: str = "local"  # a key of indexer.engines.ENGINES: local | ray
    storage_options: StorageOptions = ()  # for s3:// and gs:// inputs (store.remote), as --storage-option gives them
    ray: RayConfig = field(default_factory=RayConfig)
