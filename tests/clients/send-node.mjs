// Sends the ingestion tests' scenario (see send.py) with Segment's Node library.
//
//   node send-node.mjs URL WRITE_KEY PREFIX
import { Analytics } from '@segment/analytics-node'

const [url, writeKey, prefix] = process.argv.slice(2)
const [deviceA, deviceB, user] = [`${prefix}-device-a`, `${prefix}-device-b`, `${prefix}-user`]
const analytics = new Analytics({ writeKey, host: url, path: '/v1/batch', maxRetries: 2, flushInterval: 100 })
let failed = false
analytics.on('error', (error) => {
  failed = true
  console.error('analytics-node: the call failed:', error)
})

analytics.page({ anonymousId: deviceA, name: 'Home', properties: { path: '/' } })
analytics.page({ anonymousId: deviceA, name: 'Shoes', properties: { path: '/shoes' } })
for (let retry = 0; retry < 2; retry++) {
  analytics.track({ anonymousId: deviceA, event: 'Order Completed', properties: { revenue: 60 }, messageId: `${prefix}-order-a` })
}
analytics.identify({ userId: user, anonymousId: deviceA, traits: { email: `${prefix}@example.com` } })
analytics.page({ anonymousId: deviceB, name: 'Home' })
analytics.track({ anonymousId: deviceB, event: 'Order Completed', properties: { revenue: 50 } })
analytics.identify({ userId: user, anonymousId: deviceB, traits: { plan: 'pro' } })
analytics.track({ userId: user, event: 'Order Completed', properties: { revenue: 5 } })
await analytics.closeAndFlush({ timeout: 20000 })
if (failed) process.exit(1)
console.log('analytics-node: sent')
