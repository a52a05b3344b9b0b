"""How many worker processes serve, from the CPUs the service may use and the models it serves.

One BentoML worker runs HTTP parsing, routing and the request path in one Python thread.
For a network that costs a few MFLOPs (LeNet-5) that thread is the limit, and one worker
per CPU doubles the requests a 2-core machine answers (LeNet-5 /classify at concurrency 16:
1,552 -> 2,703 requests/s). For ImageNet networks the sessions are the cost: one worker
whose sessions use every core answers a lone request fastest (ResNet-50 at concurrency 1:
20.9 images/s with one worker, 13.6 with two one-thread workers), and each more worker
loads every model again. So ``WORKERS=0`` (the default) gives one worker per CPU when every
model served is light, else one on CPUs.

Where the models run on CUDA the sessions are the GPU's, not the cores': the cores parse HTTP and
decode images, and one worker (one event loop) cannot keep a GPU busy (ResNet-50 FP16 on an
H200 served 875 images/s with one worker, the GPU busy 17% of the time). So ``WORKERS=0``
gives one worker per four CPUs there for ImageNet networks, at most eight (each with its share
of decoder threads; light models alone keep one worker per CPU, their event loop the limit),
their sessions in one session host; four cores per worker is the CPU's arithmetic (one event
loop, about two decoder threads of ~1,950 JPEGs/s each), not yet a GPU measurement:
``benchmarks.gpu`` measures it beside WORKERS 1, 2 and 4.

Where the models run on CUDA, small images no longer decode on the event loop
(``INLINE_DECODE_BYTES`` 0 unless set): on the CPU inline decoding saves two thread hops
while the sessions hold the other cores, but on a GPU the event loop is the worker's one
thread for HTTP, and one core decodes about 1,900 of the benchmark's 256-pixel JPEGs a second
(1,830 to 1,954 in two runs of the decode stage of ``python -m benchmarks.gpu --providers cpu`` on a
2-core Xeon), below what the GPU classifies.
"""

from __future__ import annotations

import logging

from ..settings import Settings
from ..store.host import cpu_count
from ..store.layout import ModelStore, is_valid_name
from .cuda import wants_cuda

logger = logging.getLogger(__name__)

# Below this the HTTP stack costs more than the network: LeNet-5 is 0.0008, AlexNet 1.4
LIGHT_GFLOPS_PER_IMAGE = 0.1
CPUS_PER_CUDA_WORKER = 4  # heavy models on CUDA: one worker (event loop and decoders) per this many CPUs
# and no more than this many (each warms every batch shape through the one host, and takes a share of
# MEMORY_BUDGET): a 128-core node would otherwise start 32, a count nothing has measured
MAX_CUDA_WORKERS = 8


def model_gflops(store: ModelStore, name: str, version: int | None) -> float | None:
    """GFLOPs per image of the version that would serve, from its metadata; None where unknown."""
    if not is_valid_name(name):
        return None
    versions = {v.version: v for v in store.versions(name)}
    chosen = versions.get(version) if version is not None else versions.get(max(versions, default=-1))
    try:
        return float(chosen.read_metadata()["flops_per_image"]) / 1e9 if chosen is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def auto_workers(settings: Settings) -> tuple[int, str]:
    """``WORKERS=0``: the worker count, and why."""
    cpus = cpu_count()
    store = ModelStore(settings.model_store)
    wanted = settings.requested_models() or dict.fromkeys(store.names())
    costs = {name: model_gflops(store, name, version) for name, version in wanted.items()}
    unknown = sorted(name for name, gflops in costs.items() if gflops is None)  # counted as heavy: any network
    heavy = sorted(name for name, gflops in costs.items() if gflops is not None and gflops > LIGHT_GFLOPS_PER_IMAGE)
    if cpus == 1:
        return 1, "one CPU"
    if (heavy or unknown) and wants_cuda(settings):
        workers = max(1, min(MAX_CUDA_WORKERS, cpus // CPUS_PER_CUDA_WORKER))
        host = " (SESSION_HOST=auto holds the GPU's sessions in one session host)" if workers > 1 else ""
        return workers, (f"models on CUDA: one worker per {CPUS_PER_CUDA_WORKER} of {cpus} CPUs (at most "
                         f"{MAX_CUDA_WORKERS}) to parse and decode{host}")  # fmt: skip
    if heavy or unknown or not costs:
        reasons = []
        if heavy:
            reasons.append(f"{', '.join(heavy)} over {LIGHT_GFLOPS_PER_IMAGE} GFLOPs per image")
        if unknown:
            reasons.append(f"{', '.join(unknown)} of unknown cost (not in the store, or no readable metadata)")
        return 1, f"{'; '.join(reasons) or 'no model yet'}: one worker, whose sessions use all {cpus} CPUs"
    return cpus, f"every model under {LIGHT_GFLOPS_PER_IMAGE} GFLOPs per image: one worker per CPU ({cpus})"


def sized(settings: Settings) -> Settings:
    """``settings`` with ``WORKERS=0`` resolved (logged once), and decoding placed for the device."""
    if not settings.workers:
        workers, why = auto_workers(settings)
        logger.info("WORKERS=0: %d worker(s): %s", workers, why)
        settings = settings.model_copy(update={"workers": workers})
    return for_the_device(settings)


def for_the_device(settings: Settings) -> Settings:
    """On CUDA, every image decodes off the event loop unless ``INLINE_DECODE_BYTES`` was set."""
    if "inline_decode_bytes" in settings.model_fields_set or not wants_cuda(settings):
        return settings
    logger.info("models on CUDA: INLINE_DECODE_BYTES=0, every image decodes in the decoder threads")
    return settings.model_copy(update={"inline_decode_bytes": 0})
