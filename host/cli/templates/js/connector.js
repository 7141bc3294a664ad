// {{name}}: a Starling connector. POSTs each action's parameters as a JSON object to its `url`
// setting with `fetch`, with the bearer token from the secret `token` when configured.

import { get } from 'starling:plugin/config@0.2.0';

const ok = { tag: 'ok', val: undefined };
const retryable = (message) => ({ tag: 'err', val: { tag: 'retryable', val: message } });
const permanent = (message) => ({ tag: 'err', val: { tag: 'permanent', val: message } });

// Parameter values as plain JSON.
function json(value) {
  return value.tag === 'timeline' ? value.val.map((e) => ({ at: Number(e.at), value: e.value })) : value.val;
}

async function post(action, token) {
  const url = action.settings.find(([key]) => key === 'url')?.[1];
  if (!url) return permanent('no `url` setting');
  const headers = { 'content-type': 'application/json', 'idempotency-key': action.idempotencyKey };
  if (token) headers.authorization = `Bearer ${token}`;
  const body = JSON.stringify(Object.fromEntries(action.params.map(([name, value]) => [name, json(value)])));
  try {
    const response = await fetch(url, { method: 'POST', headers, body });
    if (response.ok) return ok;
    if (response.status === 429) {
      const seconds = Number(response.headers.get('retry-after') ?? '10');
      return { tag: 'err', val: { tag: 'rate-limited', val: { retryAfterMs: BigInt(Math.round(seconds * 1000)), message: 'rate limited' } } };
    }
    const message = `answered ${response.status}`;
    return response.status === 408 || response.status >= 500 ? retryable(message) : permanent(message);
  } catch (e) {
    return retryable(String(e));
  }
}

export const deliver = {
  describe() {
    return {
      description: "POSTs each action's parameters as JSON",
      settings: [{ name: 'url', description: 'where to POST', required: true }],
      params: [],
    };
  },

  async deliver(actions) {
    const token = get('token');
    const results = [];
    for (const action of actions) results.push(await post(action, token));
    return results;
  },
};
