// What both pages share: the page's parameters and how it reports to the driver.
//
// The driver (tests/js/browser_upload.mjs) exposes `window.emitEvent` before the page loads
// and prints what it is given; every event also lands in `window.events`. The last one,
// `success` or `error`, is `window.outcome`, which the driver waits for and prints itself.

export const params = new URLSearchParams(location.search)

/** Retry delays for the page's tus client: quick, the shim on loopback is back at once. */
export const RETRY_DELAYS = [0, 100, 300, 1000]

window.events = []

export function emit(event) {
  window.events.push(event)
  if (event.event === 'success' || event.event === 'error') {
    window.outcome = event // the driver prints it once it sees it
  } else if (typeof window.emitEvent === 'function') {
    window.emitEvent(event)
  }
}

/** Call `upload(file)` with the file the driver picks in the page's file input. */
export function onFilePicked(upload) {
  document.getElementById('file').addEventListener('change', (change) => {
    const [file] = change.target.files
    emit({ event: 'picked', name: file.name, size: file.size })
    upload(file)
  })
  emit({ event: 'ready' })
}
