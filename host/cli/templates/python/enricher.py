"""{{name}}: a Starling enricher. Sets a string attribute (configuration `attribute`, default
`last_event`) to the name of the latest event."""

from wit_world import exports
from wit_world.imports import config, types


class Enrich(exports.Enrich):
    def enrich(self, occasion: types.Occasion, profile: types.ProfileView) -> list[types.AttributeUpdate]:
        # Called for events, and for visit ends when the host's configuration asks for them.
        if not isinstance(occasion, types.Occasion_Event):
            return []
        event = occasion.value
        attribute = config.get("attribute") or "last_event"
        for a in profile.attributes:
            if a.name == attribute and a.value == types.AttributeValue_Text(event.name):
                return []
        return [types.AttributeUpdate(attribute, types.AttributeValue_Text(event.name))]
