"""ftx's serving layer in front of an engine (`python -m ftx.gateway`, config JSON in $FTX_GATEWAY; started by
ftx.serving.start for every engine, and as a sidecar in the Kubernetes manifests that `ftx serve k8s` renders).

llama-server alone serves one model under one alias: it answers an unknown `model` with 400 and selects LoRA
adapters by numeric id in a non-OpenAI `lora` field. The gateway makes the endpoint behave like the OpenAI API
for several names: the base model and each GGUF LoRA adapter are models (`GET /v1/models`), a request's
`model` picks the adapter (the gateway sends llama-server explicit scales for every adapter: 1 for the chosen
one, 0 for the others, since a request without scales would use the global ones), an unknown model gets an
OpenAI-style 404, and the API key is checked on every route except /health (401 otherwise). Bodies and
streams (SSE) are passed through unchanged otherwise; llama-server listens on 127.0.0.1 with its own key.

Mode `passthrough` (vLLM): names, adapters and 404s are the engine's own; the gateway only enforces the key. vLLM's
`--api-key` guards the /v1, /v2, /inference and /cohere prefixes only: /invocations (the SageMaker route, full
inference), /tokenize, /pooling, /score, /metrics and others stay open (vLLM's own warning in
`vllm serve --help`). With the gateway in front and vLLM on 127.0.0.1, every route but /health needs the key.

Keys: `api_key` (clients) and `upstream_key` (the engine's) come from the config, else from $FTX_API_KEY (the
Kubernetes sidecar reads it from a Secret).

Hot swap (`POST /ftx/upstream`, key required): the body names a new engine (upstream, upstream_key, model,
adapters). Requests that arrive after it go to the new engine; the call returns once every request still running on
the old one has finished (drained; `drain_s`, default 600), so the caller can stop the old engine without a failed
request (ftx.serving.start's `swap`, `ftx serve` on SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets


def _error(status: int, message: str, type_: str, code: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)


class _Upstream:
    """One engine behind the gateway: its address and key, its model names, the session to it, and the requests
    running on it (for draining it on a swap)."""

    def __init__(self, cfg: dict, key: str):
        self.url = cfg["upstream"]
        self.auth = {"Authorization": f"Bearer {cfg.get('upstream_key') or key}"}
        self.model, self.adapters = cfg.get("model"), cfg.get("adapters") or []
        self.names = [self.model, *self.adapters]
        self.inflight = 0
        self._session = None

    def session(self):
        import aiohttp

        # aiohttp for the engine side: its C HTTP parser costs a fraction of httpx's pure-Python h11 per streamed
        # chunk, and on a CPU box every cycle the gateway spends is taken from the engine (bench/serve_overhead.py).
        # No keep-alive to llama-server: its HTTP server closes idle/used-up connections on its own schedule, and a
        # request sent on a connection it is closing fails (2 errors in 144 requests here before this); a fresh
        # loopback connection per request costs well under a millisecond.
        if self._session is None:  # created inside the running loop
            self._session = aiohttp.ClientSession(
                self.url,
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_app(cfg: dict):
    """cfg: upstream (http://127.0.0.1:PORT), upstream_key, api_key, mode (rewrite | passthrough; the engine's
    declaration), model (base name) and adapters (names in llama-server's adapter id order; rewrite only), host,
    port."""
    import aiohttp
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    passthrough = cfg.get("mode", "rewrite") == "passthrough"
    key = cfg.get("api_key") or os.environ.get("FTX_API_KEY")
    if not key:
        raise SystemExit("ftx gateway: no API key (config api_key or $FTX_API_KEY)")
    want = f"Bearer {key}".encode()
    state = {"up": _Upstream(cfg, key)}

    def keyed(handler):
        """The route needs the API key (every route but /health): OpenAI's 401 otherwise."""

        async def route(request):
            if not secrets.compare_digest(request.headers.get("authorization", "").encode(), want):
                return _error(401, "Invalid API key", "authentication_error", "invalid_api_key")
            return await handler(request)

        return route

    async def forward(request, body: bytes | None, up: _Upstream):
        headers = {**up.auth, "Content-Type": request.headers.get("content-type", "application/json")}
        up.inflight += 1
        try:
            r = await up.session().request(
                request.method,
                request.url.path,
                params=list(request.query_params.multi_items()),
                data=body,
                headers=headers,
            )
        except (aiohttp.ClientError, OSError) as e:
            up.inflight -= 1
            return _error(502, f"engine not reachable: {type(e).__name__}", "server_error", "engine_unavailable")

        async def stream():
            try:
                async for chunk in r.content.iter_any():
                    yield chunk
            finally:  # also when the client goes away mid-stream
                r.release()
                up.inflight -= 1

        return StreamingResponse(
            stream(),
            status_code=r.status,
            headers={k: v for k, v in r.headers.items() if k.lower() in ("content-type", "cache-control")},
        )

    async def health(request):
        try:
            async with state["up"].session().get("/health") as r:
                content, status = await r.read(), r.status
        except (aiohttp.ClientError, OSError) as e:  # the engine is down or still starting: not ready, not a crash
            return _error(503, f"engine not reachable: {type(e).__name__}", "server_error", "engine_unavailable")
        return Response(content, status_code=status, media_type="application/json")

    @keyed
    async def models(request):
        up = state["up"]
        data = [
            {"id": n, "object": "model", "owned_by": "ftx", **({"parent": up.model} if n != up.model else {})}
            for n in up.names
        ]
        return JSONResponse({"object": "list", "data": data})

    @keyed
    async def generate(request):
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            return _error(400, f"request body is not JSON: {e}", "invalid_request_error", "invalid_json")
        up = state["up"]
        name = body.get("model") or up.model
        if name not in up.names:
            return _error(
                404,
                f"The model `{name}` does not exist. Models: {', '.join(up.names)}",
                "invalid_request_error",
                "model_not_found",
            )
        body["model"] = up.model
        if up.adapters:
            body["lora"] = [{"id": i, "scale": 1.0 if a == name else 0.0} for i, a in enumerate(up.adapters)]
        return await forward(request, json.dumps(body).encode(), up)

    @keyed
    async def other(request):
        return await forward(request, await request.body(), state["up"])

    @keyed
    async def swap(request):
        new = json.loads(await request.body())
        old = state["up"]
        state["up"] = _Upstream(new, key)  # every request from now on goes to the new engine
        deadline = asyncio.get_running_loop().time() + float(new.get("drain_s", 600))
        while old.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        left = old.inflight
        if not left:
            await old.close()
        return JSONResponse({"drained": not left, "inflight": left, "models": state["up"].names})

    routes = [Route("/health", health), Route("/ftx/upstream", swap, methods=["POST"])]
    if not passthrough:
        routes += [
            Route("/v1/models", models),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/completions", generate, methods=["POST"]),
        ]
    routes += [Route("/{path:path}", other, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await state["up"].close()

    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    import uvicorn

    cfg = json.loads(os.environ.pop("FTX_GATEWAY"))  # keys travel in the environment, not argv or a file
    # the stdlib event loop, not uvloop: with uvloop 0.23 and aiohttp the gateway segfaulted while idle between
    # loads (2 crashes in ~30 bench rounds here); with asyncio none in 45 rounds, for ~25% more gateway CPU
    uvicorn.run(
        make_app(cfg), host=cfg["host"], port=cfg["port"], log_level="warning", access_log=False, loop="asyncio"
    )


if __name__ == "__main__":
    main()
