"""omni-fast serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over OmniModel and its engine.

    config.py    ServeConfig: what the command sets (address, auth, media rules, limits), validated
    protocol.py  the request / response models of /v1/chat/completions and the error body
    chat.py      a parsed request -> the question, the system turn, the media parts, the modality
    sampling.py  the request's sampling fields over generation_config.json's defaults -> SamplingParams
    media.py     data: / file:// / allowed-path / allowed-domain URLs -> local files, probing, decoding
    limits.py    the checks made before any decoding (body size, parts, n, clip length, queue)
    inputs.py    a request's clip -> ClipInput (worker pool) -> prompt embeddings via OmniModel (loop thread),
                 keyed and cached as OmniModel keys and caches clips
    loop.py      the engine loop thread: Engine.step() and each request's tokens to its asyncio queue
    text.py      token ids -> text deltas as they come: incremental detokenising, stop strings, strip
    response.py  a request's outputs -> its choices, chat.completion and chat.completion.chunk bodies
    handler.py   one request from arrival to its last byte: deadline, disconnect, streaming
    state.py     what the routes share (model, loop, pool, metrics, request counts)
    metrics.py   Prometheus metrics (prometheus_client)
    app.py       the FastAPI routes and authentication
    server.py    the state around a loaded model, uvicorn with a draining SIGTERM / Ctrl-C
"""
