"""``POST /v1/chat/completions``: the chat template, tools and tool calls, streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvplane.engine.outputs import CompletionOutput, RequestOutput
from kvplane.sampling.logprobs import SampleLogprobs
from kvplane.server.conversation import render_conversation
from kvplane.server.errors import bad_request
from kvplane.server.params import build_sampling_params, structured_output_of
from kvplane.server.protocol import ChatCompletionRequest
from kvplane.server.responses import (
    DONE,
    SSEResponse,
    api_finish_reason,
    finite,
    now,
    run_to_completion,
    sse,
    sse_error,
    start_run,
    usage_of,
    usage_of_run,
)
from kvplane.server.runner import RequestRun
from kvplane.server.state import ServerState
from kvplane.server.tool_parsers import ToolCallDelta, ToolParser, get_tool_parser


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response:
    state.check_model(body.model)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    tool_choice = _tool_choice(body)
    parser = _tool_parser(state, tools, tool_choice)
    prompt = await render_conversation(
        state,
        body.messages,
        tools if parser is not None else None,
        body.add_generation_prompt,
        body.continue_final_message,
        body.chat_template_kwargs,
    )
    state.check_prompt(prompt, "messages")
    if body.max_completion_tokens:
        state.check_max_tokens(prompt, body.max_completion_tokens, "max_completion_tokens")
    else:
        state.check_max_tokens(prompt, body.max_tokens, "max_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    if (body.top_logprobs or 0) > state.settings.max_logprobs:
        raise bad_request(
            f"top_logprobs={body.top_logprobs} is more than the maximum of "
            f"{state.settings.max_logprobs}",
            "top_logprobs",
        )
    structured = structured_output_of(body)
    if parser is not None:
        try:
            forced = parser.tool_choice_constraint(tools, tool_choice, body.parallel_tool_calls)
        except ValueError as error:
            raise bad_request(str(error), "tool_choice") from error
        if forced is not None and structured is not None:
            raise bad_request(
                "response_format cannot be combined with a forced tool_choice", "tool_choice"
            )
        structured = forced or structured
        if not parser.skip_special_tokens:
            # The parser reads special tokens (tool-call markers) in the text: keep them,
            # in a copy of the request rather than the caller's.
            body = body.model_copy(update={"skip_special_tokens": False})
    params = build_sampling_params(
        body,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        max_logprobs=state.settings.max_logprobs,
        max_num_seqs=state.max_num_seqs,
        defaults=state.sampling_defaults,
        structured_output=structured,
    )
    run = state.new_run("chatcmpl", [prompt], params, body.priority)
    response = await start_run(run, request)
    if response is not None:
        return response
    formatter = _ChatFormatter(state, body, run, parser is not None, tool_choice)
    if body.stream:
        return SSEResponse(formatter.stream())
    finals = await run_to_completion(run, request)
    if isinstance(finals, Response):
        return finals
    return JSONResponse(formatter.response(finals[0]))


def _tool_choice(body: ChatCompletionRequest) -> str | dict[str, Any]:
    choice = body.tool_choice
    if choice is None:
        return "auto" if body.tools else "none"
    value: str | dict[str, Any] = choice if isinstance(choice, str) else choice.model_dump()
    if value != "none" and not body.tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    return value


def _tool_parser(
    state: ServerState, tools: list[dict[str, Any]], tool_choice: str | dict[str, Any]
) -> ToolParser | None:
    """The parser for this request's tool calls; None when tools are off."""
    if not tools or tool_choice == "none":
        return None
    try:
        return get_tool_parser(state.require_tokenizer(), state.settings.tool_call_parser)
    except ValueError as error:
        raise bad_request(str(error), "tools") from error


class _ChatFormatter:
    """Builds the response body, or the stream of chunks, of one chat request."""

    def __init__(
        self,
        state: ServerState,
        body: ChatCompletionRequest,
        run: RequestRun,
        uses_tools: bool,
        tool_choice: str | dict[str, Any],
    ) -> None:
        self.state = state
        self.body = body
        self.run = run
        self.uses_tools = uses_tools
        self.tool_choice = tool_choice
        self.created = now()

    def _new_parser(self) -> ToolParser | None:
        if not self.uses_tools:
            return None
        return get_tool_parser(self.state.require_tokenizer(), self.state.settings.tool_call_parser)

    # -- whole response --------------------------------------------------------------------

    def response(self, output: RequestOutput) -> dict[str, Any]:
        choices = []
        for completion in output.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": completion.text}
            finish_reason = completion.finish_reason
            parser = self._new_parser()
            if parser is not None:
                content, calls = parser.extract_tool_calls(completion.text)
                message["content"] = content
                if calls:
                    message["tool_calls"] = [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                        for call in calls
                    ]
                    finish_reason = _tool_finish_reason(finish_reason)
            choices.append(
                {
                    "index": completion.index,
                    "message": message,
                    "logprobs": self.logprobs(completion, 0),
                    "finish_reason": api_finish_reason(finish_reason),
                    "stop_reason": completion.stop_reason,
                }
            )
        return self._envelope("chat.completion", choices) | {"usage": usage_of([output])}

    # -- stream ----------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[str]:
        """The chunks of a stream; the run's outputs are deltas."""
        states: dict[int, _ChoiceStream] = {}
        try:
            async for _, output in self.run:
                for completion in output.outputs:
                    state = states.get(completion.index)
                    if state is None:
                        state = states[completion.index] = _ChoiceStream(self._new_parser())
                        role = {"role": "assistant", "content": ""}
                        yield sse(self._chunk(completion.index, role))
                    for delta, finish_reason, logprobs in state.advance(completion, self):
                        chunk = self._chunk(completion.index, delta, finish_reason, logprobs)
                        if self._continuous_usage:
                            chunk["usage"] = usage_of_run(self.run)
                        yield sse(chunk)
            if self.body.include_usage:
                chunk = self._envelope("chat.completion.chunk", []) | {
                    "usage": usage_of_run(self.run)
                }
                yield sse(chunk)
        except Exception as error:
            yield sse_error(error)
        finally:
            await self.run.close()
        yield DONE

    @property
    def _continuous_usage(self) -> bool:
        options = self.body.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": api_finish_reason(finish_reason),
        }
        return self._envelope("chat.completion.chunk", [choice])

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.run.request_id,
            "object": kind,
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }

    def logprobs(self, completion: CompletionOutput, start: int) -> dict[str, Any] | None:
        """The ``logprobs`` of ``completion``'s tokens from ``start`` on, as OpenAI's chat
        API returns them, or ``None`` when the request asked for none."""
        if not self.body.logprobs or completion.logprobs is None:
            return None
        top = self.body.top_logprobs or 0
        entries = completion.logprobs[start:]
        token_ids = completion.token_ids[start : start + len(entries)]
        return {
            "content": [
                _logprob_entry(token_id, entry, top)
                for token_id, entry in zip(token_ids, entries, strict=True)
            ]
        }


class _ChoiceStream:
    """What has been sent of one choice; turns its next output (a delta) into chunks."""

    def __init__(self, parser: ToolParser | None) -> None:
        self.parser = parser
        self.text = ""  # the whole text so far, kept only for a tool parser
        self.has_calls = False
        self.finished = False

    def advance(
        self, completion: CompletionOutput, formatter: _ChatFormatter
    ) -> list[tuple[dict[str, Any], str | None, dict[str, Any] | None]]:
        """``(delta, finish_reason, logprobs)`` to send for ``completion``, the part of
        the choice that is new since its previous output."""
        if self.finished:
            return []
        delta_text = completion.text
        logprobs = formatter.logprobs(completion, 0)
        deltas: list[dict[str, Any]] = []
        if self.parser is None:
            if delta_text:
                deltas.append({"content": delta_text})
        else:
            previous = self.text
            self.text += delta_text
            if delta_text:
                deltas += self._tool_delta(
                    self.parser.extract_tool_calls_streaming(previous, self.text, delta_text)
                )
            if completion.finished:
                deltas += self._tool_delta(self.parser.finish_streaming(self.text))
        sends: list[tuple[dict[str, Any], str | None, dict[str, Any] | None]] = []
        if not deltas and completion.token_ids and logprobs:
            deltas.append({})  # text held back, but the tokens' logprobs go now
        for position, delta in enumerate(deltas):
            sends.append((delta, None, logprobs if position == 0 else None))
        if completion.finished:
            self.finished = True
            reason = completion.finish_reason
            if self.has_calls:
                reason = _tool_finish_reason(reason)
            sends.append(({}, reason, None))
        return sends

    def _tool_delta(self, delta: ToolCallDelta | None) -> list[dict[str, Any]]:
        if delta is None:
            return []
        message: dict[str, Any] = {}
        if delta.content:
            message["content"] = delta.content
        if delta.tool_calls:
            self.has_calls = True
            message["tool_calls"] = [_fragment(fragment) for fragment in delta.tool_calls]
        return [message] if message else []


def _fragment(fragment: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"index": fragment.index}
    function: dict[str, Any] = {}
    if fragment.id is not None:
        result["id"] = fragment.id
        result["type"] = "function"
    if fragment.name is not None:
        function["name"] = fragment.name
    if fragment.arguments is not None:
        function["arguments"] = fragment.arguments
    result["function"] = function
    return result


def _tool_finish_reason(reason: str | None) -> str | None:
    return "tool_calls" if reason == "stop" else reason


def _logprob_entry(token_id: int, entry: SampleLogprobs, num_top: int) -> dict[str, Any]:
    chosen = entry[token_id]
    token = chosen.decoded_token or ""
    ranked = sorted(
        ((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= num_top),
        key=lambda item: item[1].rank or 0,
    )
    return {
        "token": token,
        "logprob": finite(chosen.logprob),
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [
            {
                "token": lp.decoded_token or "",
                "logprob": finite(lp.logprob),
                "bytes": list((lp.decoded_token or "").encode("utf-8")),
            }
            for _, lp in ranked[:num_top]
        ],
    }
