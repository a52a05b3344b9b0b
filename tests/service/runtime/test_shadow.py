"""Shadow traffic in-process: a candidate waiting for its turn holds nothing (issue #34's defect 3)."""

from __future__ import annotations

import asyncio

import numpy as np

from service.metrics import get_metrics
from service.runtime.shadow import Shadow
from service.settings import ShadowPair, ShadowTarget

from .harness import RuntimeFactory, StoreFactory


def test_a_shadow_waiting_for_live_traffic_to_pass_holds_no_lease(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """While the primary has live images queued the shadow waits; during that wait the candidate must be free to
    be drained, unloaded or evicted (no request of its own in flight). Once the queue is empty, it compares."""
    runtime = make_runtime(make_store(primary=[1], candidate=[1]))
    repository, control = runtime.repository, runtime.control
    control.reconcile()
    primary, candidate = repository.serving("primary"), repository.serving("candidate")
    assert primary is not None and primary.batcher is not None and candidate is not None
    pair = ShadowPair(ShadowTarget("primary"), ShadowTarget("candidate"), 1.0)
    shadow = Shadow([pair], repository, get_metrics(), queue_size=4)
    digits = np.zeros((2, 32, 32, 1), np.uint8)

    async def main() -> tuple[int, int, int]:
        probabilities = (await primary.batcher.infer(digits))[1]
        primary.batcher._queued_images = 8  # live images of the primary's waiting (saturation)
        shadow.offer(primary, digits, probabilities, 0.001)
        await asyncio.sleep(0.3)
        held_while_waiting, compared_while_waiting = candidate.in_flight, shadow.lanes[0].images
        primary.batcher._queued_images = 0  # the live traffic has passed
        for _ in range(500):  # 10 s for a busy machine's executor thread
            await asyncio.sleep(0.02)
            if shadow.lanes[0].images:
                break
        await shadow.close()
        return held_while_waiting, compared_while_waiting, shadow.lanes[0].images

    held, compared_early, compared = asyncio.run(main())
    assert held == 0
    assert compared_early == 0 and compared == 2
    assert candidate.in_flight == 0
