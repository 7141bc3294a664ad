// Starling connector in JavaScript: keeps a CRM contact property in step with audience
// membership, through HubSpot's batch upsert API, with the standard `fetch`.
//
// Actions delivered together (the action's `batch` setting) become one request:
// POST {api_base}/crm/v3/objects/contacts/batch/upsert
// {"inputs": [{"idProperty": "email", "id": EMAIL, "properties": {...}}]}
// with `Authorization: Bearer {access_token}`.
//
// Settings: `property` (required): the contact property set to "true" when the visitor joins
// the audience and "false" when they leave. Parameters: `email` (required); every other
// parameter is written to the contact property of the same name.
// Configuration: `access_token` (secret), `api_base`.

import { get } from 'starling:plugin/config@0.2.0';

const permanent = (message) => ({ tag: 'err', val: { tag: 'permanent', val: message } });
const retryable = (message) => ({ tag: 'err', val: { tag: 'retryable', val: message } });

function text(value) {
  if (value === undefined) return undefined;
  if (value.tag === 'text') return value.val;
  if (value.tag === 'number' || value.tag === 'boolean' || value.tag === 'date') return String(value.val);
  if (value.tag === 'string-set' || value.tag === 'string-array') return value.val.join(';');
  return JSON.stringify(value.val);
}

function param(action, name) {
  const found = action.params.find(([key]) => key === name);
  return found ? found[1] : undefined;
}

function setting(action, name) {
  const found = action.settings.find(([key]) => key === name);
  return found ? found[1] : undefined;
}

// The contact an action writes, or the reason it cannot.
function input(action) {
  const property = setting(action, 'property');
  if (!property) return { error: `action \`${action.name}\` has no \`property\` setting` };
  const email = text(param(action, 'email'));
  if (!email || !email.includes('@')) return { error: `profile ${action.profileId} has no email address` };
  const properties = { [property]: action.trigger === 'left' || action.trigger === 'deleted' ? 'false' : 'true' };
  for (const [name, value] of action.params) {
    if (name !== 'email') properties[name] = text(value);
  }
  return { input: { idProperty: 'email', id: email.trim().toLowerCase(), properties } };
}

function failure(status, retryAfter, reason) {
  const message = `CRM answered ${status} ${reason}`.trim();
  if (status === 429) {
    const seconds = Number(retryAfter);
    const ms = Number.isFinite(seconds) ? Math.round(seconds * 1000) : 10000;
    return { tag: 'err', val: { tag: 'rate-limited', val: { retryAfterMs: BigInt(ms), message } } };
  }
  return status === 408 || status >= 500 ? retryable(message) : permanent(message);
}

export const deliver = {
  describe() {
    return {
      description: 'keeps a CRM contact property in step with audience membership (HubSpot batch upsert)',
      settings: [{ name: 'property', description: 'contact property set to true / false on join / leave', required: true }],
      params: [
        { name: 'email', description: "the contact's email address", required: true },
        { name: 'PROPERTY', description: 'any other parameter is written to that contact property', required: false },
      ],
    };
  },

  async deliver(actions) {
    const token = get('access_token');
    if (!token) return actions.map(() => permanent('no `access_token` configured'));
    const base = (get('api_base') ?? 'https://api.hubapi.com').replace(/\/$/, '');
    const results = actions.map(() => ({ tag: 'ok', val: undefined }));
    const inputs = [];
    actions.forEach((action, i) => {
      const { input: contact, error } = input(action);
      if (error) results[i] = permanent(error);
      else inputs.push({ i, contact });
    });
    if (inputs.length === 0) return results;

    let outcome;
    try {
      const response = await fetch(`${base}/crm/v3/objects/contacts/batch/upsert`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
        body: JSON.stringify({ inputs: inputs.map(({ contact }) => contact) }),
      });
      if (response.ok) {
        outcome = { tag: 'ok', val: undefined };
      } else {
        let reason = '';
        try {
          reason = (await response.json()).message ?? '';
        } catch {
          reason = '';
        }
        outcome = failure(response.status, response.headers.get('retry-after'), reason);
      }
    } catch (e) {
      // Refused by the host's allow-list or a network failure: only the latter may pass.
      const message = String(e && e.message ? e.message : e);
      outcome = /denied|prohibited/i.test(message) ? permanent(message) : retryable(message);
    }
    for (const { i } of inputs) results[i] = outcome;
    return results;
  },
};
