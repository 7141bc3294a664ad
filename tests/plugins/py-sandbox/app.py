"""A Python connector that tries to leave its sandbox: it opens a file named by the action's
`file` setting, lists the root directory, reads the environment, and connects a socket to the
action's `port` setting. It answers each action with a permanent error whose message reports,
as JSON, what every attempt gave; a delivery that succeeded would mean the sandbox leaked."""

import json
import os
import socket

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import starling_plugin_types as types


def attempt(what):
    try:
        return {"outcome": "allowed", "value": repr(what())[:200]}
    except BaseException as e:
        return {"outcome": "refused", "error": f"{type(e).__name__}: {e}"[:200]}


def probe(settings):
    def read_file():
        with open(settings["file"]) as f:
            return f.read()

    def connect():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", int(settings["port"])))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(100)

    return {
        "file": attempt(read_file),
        "listdir": attempt(lambda: os.listdir("/")),
        "environ": dict(os.environ),
        "socket": attempt(connect),
    }


class Deliver(exports.Deliver):
    def describe(self) -> types.ConnectorInfo:
        return types.ConnectorInfo("tries to read files, the environment and sockets", [], [])

    def deliver(self, actions: list[types.Action]):
        return [Err(types.DeliveryError_Permanent(json.dumps(probe(dict(a.settings))))) for a in actions]
