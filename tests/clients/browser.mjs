// Opens the shop page (page/shop.html, with analytics.js from node_modules) in headless Chromium,
// served from its own loopback origin, pointed at a Starling server; prints what the page ended
// with as JSON: state, visitor id, the personalization answer, the offer shown, the requests
// the page made to Starling, and console errors.
//
//   node browser.mjs STARLING_URL WRITE_KEY REVENUE PAGE_PORT USER
import { chromium } from 'playwright-core'
import { createServer } from 'node:http'
import { readFile } from 'node:fs/promises'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'

const [starling, writeKey, revenue, pagePort, user] = process.argv.slice(2)
const here = dirname(fileURLToPath(import.meta.url))
const bundles = join(here, 'node_modules/@segment/analytics-next/dist/umd')

const server = createServer(async (request, response) => {
  const path = new URL(request.url, 'http://page').pathname
  if (path === '/favicon.ico') {
    response.writeHead(204)
    return response.end()
  }
  try {
    const file = path === '/shop.html' ? join(here, 'page/shop.html') : join(bundles, path.replace(/^\/+/, '').replace(/\.\./g, ''))
    const body = await readFile(file)
    response.writeHead(200, { 'content-type': file.endsWith('.html') ? 'text/html' : 'text/javascript' })
    response.end(body)
  } catch {
    response.writeHead(404)
    response.end()
  }
})
await new Promise((resolve) => server.listen(Number(pagePort), '127.0.0.1', resolve))
const origin = `http://127.0.0.1:${server.address().port}`

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
})
const result = { origin, requests: [], errors: [] }
try {
  const page = await browser.newPage()
  page.on('console', (m) => { if (m.type() === 'error') result.errors.push(m.text()) })
  page.on('pageerror', (e) => result.errors.push(String(e)))
  page.on('response', (r) => { if (r.status() >= 400) result.errors.push(`${r.status()} ${r.url()}`) })
  page.on('request', (r) => { if (r.url().startsWith(starling)) result.requests.push(`${r.method()} ${new URL(r.url()).pathname}`) })
  const query = new URLSearchParams({ starling, key: writeKey, revenue, user })
  await page.goto(`${origin}/shop.html?${query}`)
  await page.waitForFunction(() => document.body.dataset.state !== 'loading', null, { timeout: 30000 })
  Object.assign(result, await page.evaluate(() => ({
    state: document.body.dataset.state,
    visitor: document.body.dataset.visitor,
    view: document.body.dataset.view ? JSON.parse(document.body.dataset.view) : null,
    offer: document.getElementById('offer').hidden ? null : document.getElementById('offer').textContent,
    error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
  })))
} finally {
  await browser.close()
  server.close()
}
console.log(JSON.stringify(result))
