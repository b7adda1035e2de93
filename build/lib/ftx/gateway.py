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
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets


def _error(status: int, message: str, type_: str, code: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)


def make_app(cfg: dict):
    """cfg: upstream (http://127.0.0.1:PORT), upstream_key, api_key, mode (rewrite | passthrough; the engine's
    declaration), model (base name) and adapters (names in llama-server's adapter id order; rewrite only), host,
    port."""
    import aiohttp
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    upstream, passthrough = cfg["upstream"], cfg.get("mode", "rewrite") == "passthrough"
    model, adapters = cfg.get("model"), cfg.get("adapters") or []
    names = [model, *adapters]
    key = cfg.get("api_key") or os.environ.get("FTX_API_KEY")
    if not key:
        raise SystemExit("ftx gateway: no API key (config api_key or $FTX_API_KEY)")
    want = f"Bearer {key}".encode()
    auth = {"Authorization": f"Bearer {cfg.get('upstream_key') or key}"}
    # aiohttp for the engine side: its C HTTP parser costs a fraction of httpx's pure-Python h11 per streamed
    # chunk, and on a CPU box every cycle the gateway spends is taken from the engine (bench/serve_overhead.py).
    # No keep-alive to llama-server: its HTTP server closes idle/used-up connections on its own schedule, and a
    # request sent on a connection it is closing fails (2 errors in 144 requests here before this); a fresh
    # loopback connection per request costs well under a millisecond.
    state: dict = {}

    def session() -> aiohttp.ClientSession:
        if "session" not in state:  # created inside the running loop
            state["session"] = aiohttp.ClientSession(
                upstream,
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        return state["session"]

    def authorized(request) -> bool:
        got = request.headers.get("authorization", "").encode()
        return secrets.compare_digest(got, want)

    async def forward(request, body: bytes | None):
        headers = {**auth, "Content-Type": request.headers.get("content-type", "application/json")}
        try:
            r = await session().request(
                request.method,
                request.url.path,
                params=list(request.query_params.multi_items()),
                data=body,
                headers=headers,
            )
        except (aiohttp.ClientError, OSError) as e:
            return _error(502, f"engine not reachable: {type(e).__name__}", "server_error", "engine_unavailable")
        return StreamingResponse(
            r.content.iter_any(),
            status_code=r.status,
            background=BackgroundTask(r.release),
            headers={k: v for k, v in r.headers.items() if k.lower() in ("content-type", "cache-control")},
        )

    async def health(request):
        try:
            async with session().get("/health") as r:
                content, status = await r.read(), r.status
        except (aiohttp.ClientError, OSError) as e:  # the engine is down or still starting: not ready, not a crash
            return _error(503, f"engine not reachable: {type(e).__name__}", "server_error", "engine_unavailable")
        return Response(content, status_code=status, media_type="application/json")

    async def models(request):
        if not authorized(request):
            return _error(401, "Invalid API key", "authentication_error", "invalid_api_key")
        data = [
            {"id": n, "object": "model", "owned_by": "ftx", **({"parent": model} if n != model else {})} for n in names
        ]
        return JSONResponse({"object": "list", "data": data})

    async def generate(request):
        if not authorized(request):
            return _error(401, "Invalid API key", "authentication_error", "invalid_api_key")
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            return _error(400, f"request body is not JSON: {e}", "invalid_request_error", "invalid_json")
        name = body.get("model") or model
        if name not in names:
            return _error(
                404,
                f"The model `{name}` does not exist. Models: {', '.join(names)}",
                "invalid_request_error",
                "model_not_found",
            )
        body["model"] = model
        if adapters:
            body["lora"] = [{"id": i, "scale": 1.0 if a == name else 0.0} for i, a in enumerate(adapters)]
        return await forward(request, json.dumps(body).encode())

    async def other(request):
        if not authorized(request):
            return _error(401, "Invalid API key", "authentication_error", "invalid_api_key")
        return await forward(request, await request.body())

    routes = [Route("/health", health)]
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
        if "session" in state:
            await state["session"].close()

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
