// Bundle the browser pages with esbuild into a folder the test serves as a static site:
// <out>/<page>.html loads <out>/<page>.js. No browser is downloaded; nothing leaves the disk.
//
// Usage: node tests/js/browser/build.mjs <out-dir>

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { build } from 'esbuild'

const PAGES = ['uppy_page', 'tus_ietf_page']

const here = dirname(fileURLToPath(import.meta.url))
const out = process.argv[2]
if (!out) {
  process.stderr.write('usage: node build.mjs <out-dir>\n')
  process.exit(2)
}
mkdirSync(out, { recursive: true })
const html = readFileSync(join(here, 'page.html'), 'utf8')
for (const page of PAGES) {
  await build({
    entryPoints: [join(here, `${page}.mjs`)],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'chrome120',
    outfile: join(out, `${page}.js`),
    logLevel: 'warning',
  })
  writeFileSync(join(out, `${page}.html`), html.replace('PAGE', page))
}
