"""{{name}}: a Starling enricher. Sets a string attribute (configuration `attribute`, default
`last_event`) to the name of the latest event."""

from wit_world import exports
from wit_world.imports import config, types


class Enrich(exports.Enrich):
    def enrich(self, event: types.Event, profile: types.ProfileView) -> list[types.AttributeUpdate]:
        attribute = config.get("attribute") or "last_event"
        for a in profile.attributes:
            if a.name == attribute and a.value == types.AttributeValue_Text(event.name):
                return []
        return [types.AttributeUpdate(attribute, types.AttributeValue_Text(event.name))]
