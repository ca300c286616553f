"""Output sinks: what a stream has not taken yet is merged (deltas add up, a newer
cumulative output replaces the older), errors keep their place, and a step's outputs
reach their streams from another thread in one wake-up."""

from __future__ import annotations

import asyncio
import threading

from kvplane.engine.output_sink import OutputSink, put_all
from kvplane.engine.outputs import CompletionOutput, RequestOutput
from kvplane.sampling.params import RequestOutputKind


def output(text: str, token_ids: list[int], finish_reason: str | None = None) -> RequestOutput:
    completion = CompletionOutput(0, text, token_ids, -1.5, None, finish_reason)
    return RequestOutput("r", None, [7, 8], None, [completion], finish_reason is not None)


def drain(sink: OutputSink) -> list[RequestOutput | BaseException]:
    async def take(count: int) -> list[RequestOutput | BaseException]:
        return [await sink.get() for _ in range(count)]

    return sink.loop.run_until_complete(take(len(sink._pending)))


def test_deltas_waiting_add_up() -> None:
    loop = asyncio.new_event_loop()
    sink = OutputSink("r", loop, RequestOutputKind.DELTA)
    sink.put(output(" a", [1]))
    sink.put(output(" b", [2]))
    sink.put(output(" c", [3], "length"))
    (merged,) = drain(sink)
    assert isinstance(merged, RequestOutput)
    assert merged.outputs[0].text == " a b c" and merged.outputs[0].token_ids == [1, 2, 3]
    assert merged.finished and merged.outputs[0].finish_reason == "length"
    assert merged.prompt_token_ids == [7, 8]
    loop.close()


def test_a_newer_cumulative_output_replaces_the_waiting_one() -> None:
    loop = asyncio.new_event_loop()
    sink = OutputSink("r", loop, RequestOutputKind.CUMULATIVE)
    sink.put(output(" a", [1]))
    newer = output(" a b", [1, 2])
    sink.put(newer)
    assert drain(sink) == [newer]
    loop.close()


def test_an_error_keeps_its_place() -> None:
    loop = asyncio.new_event_loop()
    sink = OutputSink("r", loop, RequestOutputKind.DELTA)
    error = RuntimeError("engine stopped")
    sink.put(output(" a", [1]))
    sink.put(error)
    sink.put(output(" b", [2]))  # never merged into the error
    items = drain(sink)
    assert items[1] is error and len(items) == 3
    loop.close()


def test_outputs_from_another_thread_wake_the_stream() -> None:
    async def main() -> list[RequestOutput | BaseException]:
        loop = asyncio.get_running_loop()
        sinks = [OutputSink(f"r{i}", loop, RequestOutputKind.DELTA) for i in range(3)]
        batch = [(sink, output(" x", [i])) for i, sink in enumerate(sinks)]
        thread = threading.Thread(target=loop.call_soon_threadsafe, args=(put_all, batch))
        waiters = [asyncio.ensure_future(sink.get()) for sink in sinks]
        await asyncio.sleep(0)
        assert not any(waiter.done() for waiter in waiters)
        thread.start()
        got = await asyncio.wait_for(asyncio.gather(*waiters), timeout=10)
        thread.join()
        return got

    got = asyncio.run(main())
    assert [item.outputs[0].token_ids for item in got] == [[0], [1], [2]]  # type: ignore[union-attr]
