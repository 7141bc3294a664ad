"""{{name}}: a Starling connector in Python. POSTs each action's parameters as a JSON object to
its `url` setting through wasi:http (the host allows only the manifest's `allowed_hosts`), with
the bearer token from the secret `token` when configured."""

import json
from urllib.parse import urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import config, outgoing_handler
from wit_world.imports import starling_plugin_types as types
from wit_world.imports import wasi_http_types as http

# A stream takes at most this many bytes per blocking write.
CHUNK = 4096


def post(url: str, headers: dict[str, str], body: bytes) -> int:
    """POSTs `body` to `url`; the answer's status. Raises on a refused or failed request."""
    parts = urlsplit(url)
    fields = http.Fields.from_list([(name, value.encode()) for name, value in headers.items()])
    request = http.OutgoingRequest(fields)
    request.set_method(http.Method_Post())
    request.set_scheme(http.Scheme_Https() if parts.scheme == "https" else http.Scheme_Http())
    request.set_authority(parts.netloc)
    request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    outgoing = request.body()
    future = outgoing_handler.handle(request, None)
    with outgoing.write() as stream:
        for start in range(0, len(body), CHUNK):
            stream.blocking_write_and_flush(body[start : start + CHUNK])
    http.OutgoingBody.finish(outgoing, None)
    with future.subscribe() as ready:
        ready.block()
    # Ready: Ok (the first `get`) holding Ok(response) or Err(error code).
    answer = future.get().value
    if isinstance(answer, Err):
        raise RuntimeError(f"request failed: {answer.value}")
    with answer.value as response:
        return response.status()


def plain(value):
    """A parameter value as plain JSON."""
    if isinstance(value, types.AttributeValue_Timeline):
        return [{"at": e.at_ms, "data": json.loads(e.data_json)} for e in value.value]
    if isinstance(value, types.AttributeValue_Tally):
        return dict(value.value)
    if isinstance(value, types.AttributeValue_Json):
        return json.loads(value.value)
    return value.value


def deliver_one(action: types.Action, token: str | None):
    url = dict(action.settings).get("url")
    if not url:
        return Err(types.DeliveryError_Permanent("no `url` setting"))
    headers = {"content-type": "application/json", "idempotency-key": action.idempotency_key}
    if token:
        headers["authorization"] = f"Bearer {token}"
    body = json.dumps({name: plain(value) for name, value in action.params}).encode()
    try:
        status = post(url, headers, body)
    except Exception as e:
        return Err(types.DeliveryError_Retryable(str(e)))
    if 200 <= status < 300:
        return Ok(None)
    if status == 429:
        return Err(types.DeliveryError_RateLimited(types.RateLimited(10_000, "rate limited")))
    message = f"answered {status}"
    if status == 408 or status >= 500:
        return Err(types.DeliveryError_Retryable(message))
    return Err(types.DeliveryError_Permanent(message))


class Deliver(exports.Deliver):
    def describe(self) -> types.ConnectorInfo:
        return types.ConnectorInfo(
            "POSTs each action's parameters as JSON",
            [types.Parameter("url", "where to POST", True)],
            [],
        )

    def deliver(self, actions: list[types.Action]):
        token = config.get("token")
        return [deliver_one(action, token) for action in actions]
