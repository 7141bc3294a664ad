// Starling enricher in JavaScript: an engagement score from the visitor's activity.
//
// score = events this visit × `visit_weight` + lifetime visits × `visit_count_weight`, capped at
// 100, written to the number attribute named by `score_attribute` (default `engagement`).

import { get } from 'starling:plugin/config@0.2.0';

function number(key, fallback) {
  const raw = get(key);
  if (raw === undefined || raw === null) return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n)) throw { tag: 'misconfigured', val: `configuration \`${key}\` = \`${raw}\` is not a number` };
  return n;
}

function attribute(profile, name) {
  const found = profile.attributes.find((a) => a.name === name);
  return found && found.value.tag === 'number' ? found.value.val : 0;
}

export const enrich = {
  // The same score after each event and when the visit ends.
  enrich(_occasion, profile) {
    const target = get('score_attribute') ?? 'engagement';
    const visitWeight = number('visit_weight', 2);
    const visitsWeight = number('visit_count_weight', 5);
    const raw = attribute(profile, 'visit_event_count') * visitWeight + attribute(profile, 'visit_count') * visitsWeight;
    const score = Math.min(100, Math.round(raw));
    if (attribute(profile, target) === score) return [];
    return [{ name: target, value: { tag: 'number', val: score } }];
  },
};
