"""An OpenAI-compatible HTTP server over the engine (Starlette + uvicorn).

    app = make_app(engine, "smollm2-135m")        # an ASGI app
    serve(engine, "smollm2-135m", host="127.0.0.1", port=8000)

Routes: `POST /v1/completions` and `/v1/chat/completions` (the model's chat template),
both streaming as server-sent events with `"stream": true`; `GET /v1/models`,
`/health` and `/metrics` (Prometheus text). A bad request gets 400 with a JSON error
naming the field; a full waiting queue 429; a stopped engine 503. A client that goes
away cancels its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from pallax.runtime.engine_handle import EngineBusy, EngineClosed

SAMPLING = {  # OpenAI field -> (engine keyword, allowed types)
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", (int,)),  # vLLM's extensions: top_k, min_p, ignore_eos
    "min_p": ("min_p", (int, float)),
    "seed": ("seed", (int,)),
    "stop": ("stop", (str, list)),
    "ignore_eos": ("ignore_eos", (bool,)),
}
UNSUPPORTED = {  # fields we refuse rather than ignore, with the value that means "off"
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None,
    "tools": None, "response_format": None,
}  # fmt: skip


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None, kind="invalid_request_error"):
    from starlette.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _field(body: dict, name: str, types, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise BadRequest(f"'{name}' must be {want}, got {json.dumps(value)}", name)
    return value


def _request_args(body: dict, chat: bool) -> dict:
    """The engine's submit keywords from an OpenAI request body (validated)."""
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] is not None and body[name] != off:
            raise BadRequest(f"'{name}'={json.dumps(body[name])} is not supported", name)
    kw = {"temperature": 1.0}  # OpenAI's default
    for name, (key, types) in SAMPLING.items():
        value = _field(body, name, types)
        if value is not None:
            kw[key] = value
    limit = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    kw["max_new_tokens"] = _field(body, limit, (int,), 16 if not chat else None)
    if kw["max_new_tokens"] is None:
        kw.pop("max_new_tokens")
    elif kw["max_new_tokens"] < 1:
        raise BadRequest(f"'{limit}'={kw['max_new_tokens']} must be at least 1", limit)
    return kw


def make_app(engine, model_name: str):
    """The Starlette app serving `engine` under the model id `model_name`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    started = int(time.time())
    tokenizer = engine.compiled.tokenizer

    async def health(_: Request):
        if engine._error is not None or engine._closing:
            return _error(503, "the engine is not running", kind="server_error")
        return JSONResponse({"status": "ok"})

    async def models(_: Request):
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "pallax"}
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(_: Request):
        stats = engine.stats()
        lines = []
        for key, value in sorted(stats.items()):
            gauge = key in ("running", "waiting", "kv_pages", "kv_pages_used")
            name = f"pallax_{key}" if gauge else f"pallax_{key}_total"
            lines += [f"# TYPE {name} {'gauge' if gauge else 'counter'}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def completions(request: Request):
        return await _generate(request, chat=False)

    async def chat_completions(request: Request):
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not JSON: {e}")
        try:
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            name = body.get("model")
            if name is not None and name != model_name:
                return _error(404, f"model {name!r} does not exist; this server serves "
                                   f"{model_name!r}", "model", "not_found_error")  # fmt: skip
            stream = _field(body, "stream", (bool,), False)
            kw = _request_args(body, chat)
            prompt = _chat_prompt(body, tokenizer) if chat else _prompt(body)
            handle = engine.submit(prompt, **kw)
        except BadRequest as e:
            return _error(400, str(e), e.param)
        except EngineBusy as e:
            return _error(429, str(e), kind="rate_limit_error")
        except EngineClosed as e:
            return _error(503, str(e), kind="server_error")
        except (ValueError, TypeError) as e:  # the engine's own checks name the value
            return _error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"
        if stream:
            gen = _events(handle, rid, kind, chat, model_name, body.get("stream_options"))
            return StreamingResponse(gen, media_type="text/event-stream")
        while not handle.done:  # poll, so that a client that leaves cancels the request
            if await request.is_disconnected():
                handle.cancel()
                return _error(499, "the client closed the request")
            await asyncio.sleep(0.02)
        res = handle.result()
        choice = {"index": 0, "finish_reason": res.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": res.text}
        else:
            choice |= {"text": res.text, "logprobs": None}
        return JSONResponse({
            "id": rid, "object": kind, "created": int(time.time()), "model": model_name,
            "choices": [choice], "usage": _usage(res),
        })  # fmt: skip

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    ):
        return prompt
    raise BadRequest(
        "'prompt' must be a non-empty string or a list of token ids (one prompt per request), "
        f"got {json.dumps(prompt)[:80]}",
        "prompt",
    )


def _chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role'", "messages")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _usage(res) -> dict:
    p, c = len(res.prompt_token_ids), len(res.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _events(handle, rid, kind, chat, model_name, options):
    """Server-sent events of one request; the request is cancelled if the client leaves."""
    base = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": int(time.time()),
            "model": model_name}  # fmt: skip

    def event(delta_text=None, finish=None, role=False):
        if chat:
            delta = {"role": "assistant"} if role else {}
            if delta_text is not None:
                delta["content"] = delta_text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None,
                      "finish_reason": finish}  # fmt: skip
        return f"data: {json.dumps(base | {'choices': [choice]})}\n\n"

    try:
        if chat:
            yield event(role=True)
        async for piece in handle:
            yield event(piece)
        res = handle.result()
        yield event(None if chat else "", res.finish_reason)
        if isinstance(options, dict) and options.get("include_usage"):
            yield f"data: {json.dumps(base | {'choices': [], 'usage': _usage(res)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # no effect once done; a client that left ends its request


def serve(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.run(make_app(engine, model_name), host=host, port=port, log_level="warning")
