// {{name}}: a Starling enricher. Sets a string attribute (configuration `attribute`, default
// `last_event`) to the name of the latest event.

import { get } from 'starling:plugin/config@0.2.0';

export const enrich = {
  // Called for events ({ tag: 'event', val }), and for visit ends ({ tag: 'visit-ended', val: ms })
  // when the host's configuration asks for them.
  enrich(occasion, profile) {
    if (occasion.tag !== 'event') return [];
    const event = occasion.val;
    const attribute = get('attribute') ?? 'last_event';
    const current = profile.attributes.find((a) => a.name === attribute);
    if (current && current.value.tag === 'text' && current.value.val === event.name) return [];
    return [{ name: attribute, value: { tag: 'text', val: event.name } }];
  },
};
