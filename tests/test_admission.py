"""The pixel budget (service/admission.py): by itself on an event loop, then in the real app over HTTP."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.admission import Busy, PixelBudget
from service.images import probe_image
from tests.api_support import api_client, photo, resized_jpeg


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


# ---------------------------------------------------------------------------------------------------------------
# PixelBudget on its own


def test_requests_within_the_budget_run_together_and_the_rest_wait_in_order():
    async def scenario():
        budget = PixelBudget(100, timeout_s=5)
        events: list[tuple[str, str, int]] = []  # (name, "in"/"out", pixels in use just after)
        gate = asyncio.Event()

        async def request(name: str, pixels: int):
            async with budget.reserve(pixels):
                events.append((name, "in", budget.in_use))
                await gate.wait()
            events.append((name, "out", budget.in_use))

        tasks = [asyncio.create_task(request("a", 60))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("b", 40)))  # fits beside a: 100
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("c", 50)))  # must wait
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("d", 1)))  # fits in no budget left, and never overtakes c
        await asyncio.sleep(0.01)
        assert events == [("a", "in", 60), ("b", "in", 100)]
        assert budget.waiting == 2
        gate.set()
        await asyncio.gather(*tasks)
        assert budget.in_use == 0 and budget.waiting == 0
        entered = [name for name, what, _ in events if what == "in"]
        assert entered == ["a", "b", "c", "d"]
        first_out = next(k for k, (_, what, _) in enumerate(events) if what == "out")
        c_in = next(k for k, (name, what, _) in enumerate(events) if (name, what) == ("c", "in"))
        assert c_in > first_out  # c got in only once a or b had left
        assert max(in_use for _, what, in_use in events if what == "in") <= 100


def test_a_request_larger_than_the_whole_budget_runs_alone():
    async def scenario():
        budget = PixelBudget(100, timeout_s=5)
        release = asyncio.Event()
        seen = []

        async def small():
            async with budget.reserve(10):
                await release.wait()

        async def huge():
            async with budget.reserve(1_000):
                seen.append(budget.in_use)

        holder = asyncio.create_task(small())
        await asyncio.sleep(0)
        big = asyncio.create_task(huge())
        await asyncio.sleep(0.01)
        assert seen == [] and budget.waiting == 1  # not beside another request
        release.set()
        await asyncio.gather(holder, big)
        assert seen == [1_000] and budget.in_use == 0

    run(scenario())


def test_waiting_past_the_timeout_is_busy_with_retry_after_and_leaves_no_trace():
    async def scenario():
        budget = PixelBudget(100, timeout_s=0.05)
        release = asyncio.Event()

        async def holder():
            async with budget.reserve(100):
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        with pytest.raises(Busy) as err:
            async with budget.reserve(1):
                pass
        assert err.value.status == 503 and err.value.code == "busy"
        assert int(err.value.headers["Retry-After"]) >= 1
        assert budget.waiting == 0  # the timed-out request left the queue
        release.set()
        await task
        assert budget.in_use == 0
        async with budget.reserve(100):  # and the budget is whole again
            assert budget.in_use == 100

    run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_lets_the_next_one_in():
    async def scenario():
        budget = PixelBudget(100, timeout_s=5)
        release = asyncio.Event()
        entered = []

        async def request(name, pixels, wait=None):
            async with budget.reserve(pixels):
                entered.append(name)
                if wait is not None:
                    await wait.wait()

        holder = asyncio.create_task(request("holder", 90, release))
        await asyncio.sleep(0)
        big = asyncio.create_task(request("big", 50))  # head of the queue
        small = asyncio.create_task(request("small", 10))  # fits now, but behind big
        await asyncio.sleep(0.01)
        assert entered == ["holder"] and budget.waiting == 2
        big.cancel()  # the client went away
        await asyncio.sleep(0.01)
        assert entered == ["holder", "small"]  # no longer blocked behind a request nobody waits for
        release.set()
        await asyncio.gather(holder, small)
        with pytest.raises(asyncio.CancelledError):
            await big
        assert budget.in_use == 0 and budget.waiting == 0

    run(scenario())


# ---------------------------------------------------------------------------------------------------------------
# In the app, over HTTP


def test_concurrent_requests_beyond_the_budget_queue_and_all_succeed(models_dir, faces_dir, tmp_path):
    image = resized_jpeg(photo(faces_dir, "groups/couple.jpg"), 640, 480)
    pixels = probe_image(image).pixels
    with api_client(models_dir, tmp_path, max_pixels_in_flight=pixels, inference_workers=2) as client:
        runtime = client.app.state.runtime
        in_use_at_decode = []
        lock = threading.Lock()
        decode = runtime._decode

        def recording_decode(data):
            with lock:
                in_use_at_decode.append(runtime.admission.in_use)
            return decode(data)

        runtime._decode = recording_decode
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.post("/detect", files={"image": ("a.jpg", image)}), range(6)))
        assert [a.status_code for a in answers] == [200] * 6
        assert all(len(a.json()["faces"]) == 2 for a in answers)
        # Two workers could decode two images at once; the budget allowed one image's pixels at a time.
        assert in_use_at_decode == [pixels] * 6
        metrics = client.get("/metrics").text
        assert "face_pixels_in_flight 0.0" in metrics and "face_requests_waiting 0.0" in metrics


def test_a_request_that_cannot_get_in_is_a_503_busy(models_dir, faces_dir, tmp_path):
    image = photo(faces_dir, "pairs/img1.jpg")
    with api_client(models_dir, tmp_path, max_pixels_in_flight=probe_image(image).pixels, queue_timeout_s=0.2) as client:
        budget = client.app.state.runtime.admission
        held = budget.reserve(1)  # someone else's request, holding part of the budget

        client.portal.call(held.__aenter__)
        try:
            answer = client.post("/detect", files={"image": ("a.jpg", image)})
        finally:
            client.portal.call(held.__aexit__, None, None, None)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "busy"
        assert int(answer.headers["Retry-After"]) >= 1
        # Once the budget is free again the same request goes through.
        again = client.post("/detect", files={"image": ("a.jpg", image)})
        assert again.status_code == 200 and len(again.json()["faces"]) == 1
