"""{{name}}: a Starling connector in Python. Writes each action, with its parameters as JSON, to
the host's log (a destination for trying out audiences and actions).

Python connectors cannot send HTTP themselves yet: componentize-py replaces either all of WASI
or none of it with stubs, and a plugin may import only what its world grants, so the Python
toolchain's wasi:http is stubbed along with the rest. Use Rust, JavaScript or C for a connector
that calls a service."""

import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import config, log
from wit_world.imports import starling_plugin_types as types


def plain(value):
    """A parameter value as plain JSON."""
    if isinstance(value, types.AttributeValue_Timeline):
        return [{"at": e.at, "value": e.value} for e in value.value]
    if isinstance(value, types.AttributeValue_Tally):
        return dict(value.value)
    if isinstance(value, types.AttributeValue_Json):
        return json.loads(value.value)
    return value.value


class Deliver(exports.Deliver):
    def describe(self) -> types.ConnectorInfo:
        return types.ConnectorInfo("writes each action to the host's log", [], [])

    def deliver(self, actions: list[types.Action]):
        prefix = config.get("prefix") or "action"
        results = []
        for action in actions:
            if not action.name:
                results.append(Err(types.DeliveryError_Permanent("an action without a name")))
                continue
            params = {name: plain(value) for name, value in action.params}
            log.log(log.Level.INFO, f"{prefix} {action.name} for {action.profile_id}: {json.dumps(params)}")
            results.append(Ok(None))
        return results
