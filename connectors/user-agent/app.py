"""Starling enricher in Python: derives device type, browser and operating system from the
event's user agent (`data.user_agent`) into string attributes.

Configuration (optional): `device_attribute` (default `device`), `browser_attribute` (default
`browser`), `os_attribute` (default `os`), `field` (default `user_agent`).
"""

import json

from wit_world import exports
from wit_world.imports import config, types

# Checked in order: the first match wins.
BROWSERS = [
    ("Edg/", "Edge"),
    ("OPR/", "Opera"),
    ("SamsungBrowser/", "Samsung Internet"),
    ("Firefox/", "Firefox"),
    ("FxiOS/", "Firefox"),
    ("CriOS/", "Chrome"),
    ("Chrome/", "Chrome"),
    ("Safari/", "Safari"),
]
SYSTEMS = [
    ("Windows", "Windows"),
    ("iPhone", "iOS"),
    ("iPad", "iOS"),
    ("Android", "Android"),
    ("Mac OS X", "macOS"),
    ("CrOS", "ChromeOS"),
    ("Linux", "Linux"),
]


def classify(agent: str) -> tuple[str, str, str]:
    lower = agent.lower()
    if any(bot in lower for bot in ("bot", "crawler", "spider")):
        device = "bot"
    elif "ipad" in lower or "tablet" in lower or ("android" in lower and "mobile" not in lower):
        device = "tablet"
    elif "mobi" in lower or "iphone" in lower:
        device = "mobile"
    else:
        device = "desktop"
    browser = next((name for token, name in BROWSERS if token in agent), "other")
    system = next((name for token, name in SYSTEMS if token in agent), "other")
    return device, browser, system


class Enrich(exports.Enrich):
    def enrich(self, occasion: types.Occasion, profile: types.ProfileView) -> list[types.AttributeUpdate]:
        if not isinstance(occasion, types.Occasion_Event):
            return []
        event = occasion.value
        field = config.get("field") or "user_agent"
        agent = json.loads(event.data_json).get(field)
        if not isinstance(agent, str) or not agent:
            return []
        device, browser, system = classify(agent)
        current = {a.name: a.value for a in profile.attributes}
        updates = []
        for key, default, value in (
            ("device_attribute", "device", device),
            ("browser_attribute", "browser", browser),
            ("os_attribute", "os", system),
        ):
            name = config.get(key) or default
            if current.get(name) != types.AttributeValue_Text(value):
                updates.append(types.AttributeUpdate(name, types.AttributeValue_Text(value)))
        return updates
