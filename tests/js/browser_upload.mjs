// Upload one file from a page in a real headless Chromium; driven by the Python test suite.
//
// Usage: node tests/js/browser_upload.mjs '<json>'
// where <json> is an object with:
//   page        URL of a page built by browser/build.mjs, with its ?endpoint=... query
//   file        path of the file to pick in the page's file input
//   chromium?   the browser to run (default: /usr/bin/chromium, Debian's package)
//   timeout?    ms to wait for the page's outcome (default 60000)
//
// The browser is Debian's Chromium driven by playwright-core, which downloads no browser.
// It prints the page's events as JSON lines on stdout (see browser/report.mjs): `ready`,
// `picked`, `progress`, `retry`, then `success` (exit 0) or `error` (exit 1); any message
// the page logs to its console as {"event":"console",...}. Exit code 2: unusable arguments.

import { chromium } from 'playwright-core'

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`)
}

let args
try {
  args = JSON.parse(process.argv[2])
} catch (error) {
  process.stderr.write(`bad arguments: ${error}\n`)
  process.exit(2)
}

// The flags a root user in a closed network needs: no sandbox (root), and none of
// Chromium's own background connections, which this network refuses.
const browser = await chromium.launch({
  executablePath: args.chromium ?? '/usr/bin/chromium',
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
})
let code = 1
try {
  const page = await browser.newPage()
  await page.exposeFunction('emitEvent', emit)
  page.on('console', (message) => emit({ event: 'console', type: message.type(), text: message.text() }))
  page.on('pageerror', (error) => emit({ event: 'console', type: 'pageerror', text: String(error) }))
  await page.goto(args.page)
  await page.waitForFunction(() => window.events?.some((event) => event.event === 'ready'))
  await page.setInputFiles('#file', args.file)
  await page.waitForFunction(() => window.outcome, null, { timeout: args.timeout ?? 60000 })
  const outcome = await page.evaluate(() => window.outcome)
  emit(outcome)
  code = outcome.event === 'success' ? 0 : 1
} catch (error) {
  emit({ event: 'error', message: `driver: ${error}` })
} finally {
  await browser.close()
}
process.exit(code)
