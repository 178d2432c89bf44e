// Upload one file with tus-js-client under Node.js; driven by the Python test suite.
//
// Usage: node tests/js/tus_upload.mjs '<json>'
// where <json> is an object with:
//   endpoint              creation URL (e.g. http://127.0.0.1:PORT/files/)
//   file                  path of the file to upload
//   chunkSize?            bytes per PATCH (default: whole rest of the file in one PATCH)
//   parallelUploads?      number of partial uploads (concatenation extension)
//   metadata?             object of Upload-Metadata key/values
//   protocol?             "tus-v1" (default) | "ietf-draft-03" | "ietf-draft-05"
//   uploadUrl?            resume this upload URL instead of creating a new upload
//   headers?              extra request headers
//   retryDelays?          array of ms between retries; null disables retries
//                         (default: tus-js-client's [0, 1000, 3000, 5000])
//   stopAfterBytes?       abort once progress reaches this many bytes, print an "aborted"
//                         event with the upload URL and exit with code 3
//   uploadLengthDeferred? create the upload without Upload-Length (sent with the last PATCH)
//   uploadDataDuringCreation?  send the first chunk with the creation POST
//   traceResponses?       print a "response" event for every HTTP exchange (see below)
//   holdAfterBytes?       hand over the file's bytes up to (not including) this position, then
//                         send nothing more in the middle of the request body that carries
//                         it (which never ends), print a "holding" event and wait: the test
//                         then breaks the connection (kills this process, or the server).
//                         Used once; the position must fall strictly inside a request body.
//
// It prints JSON lines on stdout:
//   {"event":"url","url":...}                  as soon as the upload URL is known
//   {"event":"progress","sent":n,"total":n}    at most every 5% (and at the end)
//   {"event":"success","url":...}              done, exit 0
//   {"event":"aborted","url":...,"sent":n}     stopAfterBytes reached, exit 3
//   {"event":"holding","url":...,"sent":n}     holdAfterBytes reached: n bytes handed over
//   {"event":"error","message":...,"status":n} failed, exit 1 (status: last HTTP status or null)
//   {"event":"response","method":...,"url":...,"status":n,"requestOffset":...,
//    "responseOffset":...,"upstreamStatus":...,"upstreamLocation":...}
//                                              only with traceResponses: one per answered
//                                              request (offsets and the Shim-Upstream-*
//                                              headers as strings, or null when absent)
// Exit code 2 means the arguments were unusable.
//
// No URL storage or fingerprinting is used: resuming is explicit through `uploadUrl`.
//
// The file is read through our own FileSliceSource (a `fileReader` option) instead of
// tus-js-client's built-in fs.ReadStream source: the built-in one reports `done` only for
// a slice that covers the whole file, so with a finite chunkSize the last PATCH of an
// ietf-draft upload carries `Upload-Complete: ?0`, and with `uploadLengthDeferred` the
// upload never learns its length.  Ours reads every slice lazily from disk (constant memory,
// random access, so resuming at any offset and parallel uploads work).

import { createReadStream, ReadStream, statSync } from 'node:fs'
import { PassThrough } from 'node:stream'
import * as tus from 'tus-js-client'

const PROGRESS_STEP = 0.05

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`)
}

function fail(message, status = null, code = 1) {
  emit({ event: 'error', message, status })
  process.exit(code)
}

// holdAfterBytes: {at, reached()} until the slice containing file position `at` was made.
let hold = null

// A stream of the file's bytes [start, at) that never ends; calls reached() once they are read.
function heldStream(path, start, at, reached) {
  const body = new PassThrough()
  const head = createReadStream(path, { start, end: at - 1 }) // inclusive
  head.on('end', reached)
  head.pipe(body, { end: false })
  return body
}

// A random-access source over [offset, offset + size) of a file on disk.
class FileSliceSource {
  constructor(path, offset, size) {
    this._path = path
    this._offset = offset
    this.size = size
  }

  slice(start, end) {
    const stop = Math.min(end, this.size)
    const length = Math.max(0, stop - start)
    const done = stop >= this.size
    if (length === 0) {
      const empty = Buffer.alloc(0)
      empty.size = 0
      return Promise.resolve({ value: empty, done })
    }
    const from = this._offset + start
    const to = this._offset + stop
    if (hold !== null && from < hold.at && hold.at < to) {
      const { at, reached } = hold
      hold = null
      const body = heldStream(this._path, from, at, reached)
      body.size = length
      return Promise.resolve({ value: body, done })
    }
    const stream = createReadStream(this._path, {
      start: from,
      end: to - 1, // inclusive
    })
    stream.size = length
    return Promise.resolve({ value: stream, done })
  }

  close() {}
}

// An in-memory source; only used for an empty part of a parallel upload.
class BufferSliceSource {
  constructor(buffer) {
    this._buffer = buffer
    this.size = buffer.length
  }

  slice(start, end) {
    const stop = Math.min(end, this.size)
    const value = this._buffer.subarray(start, stop)
    value.size = value.length
    return Promise.resolve({ value, done: stop >= this.size })
  }

  close() {}
}

// tus-js-client calls openFile with our top-level ReadStream and, for parallel uploads, with
// the ReadStreams returned by slice() (they carry path, start and end).
const fileReader = {
  openFile(input) {
    if (Buffer.isBuffer(input)) return Promise.resolve(new BufferSliceSource(input))
    if (!(input instanceof ReadStream)) {
      return Promise.reject(new Error('tus_upload.mjs: expected an fs.ReadStream'))
    }
    const path = input.path.toString()
    const start = input.start ?? 0
    const end = Number.isFinite(input.end) ? input.end + 1 : statSync(path).size
    input.destroy()
    return Promise.resolve(new FileSliceSource(path, start, end - start))
  },
}

function parseArgs() {
  const raw = process.argv[2]
  if (raw === undefined) fail('usage: node tus_upload.mjs <json-args>', null, 2)
  let args
  try {
    args = JSON.parse(raw)
  } catch (err) {
    fail(`arguments are not JSON: ${err.message}`, null, 2)
  }
  if (args === null || typeof args !== 'object') fail('arguments must be a JSON object', null, 2)
  if (typeof args.file !== 'string') fail('"file" is required', null, 2)
  if (!args.endpoint && !args.uploadUrl) fail('"endpoint" or "uploadUrl" is required', null, 2)
  return args
}

function progressReporter(fileSize) {
  const step = Math.max(1, Math.floor(fileSize * PROGRESS_STEP))
  let next = 0
  return (sent, total) => {
    const known = total ?? fileSize
    if (sent < next && sent < known) return
    emit({ event: 'progress', sent, total: known })
    next = sent + step
  }
}

function buildOptions(args, fileSize, hooks) {
  const options = {
    endpoint: args.endpoint ?? null,
    uploadUrl: args.uploadUrl ?? null,
    metadata: args.metadata ?? {},
    headers: args.headers ?? {},
    protocol: args.protocol ?? 'tus-v1',
    parallelUploads: args.parallelUploads ?? 1,
    uploadLengthDeferred: Boolean(args.uploadLengthDeferred),
    uploadDataDuringCreation: Boolean(args.uploadDataDuringCreation),
    fileReader,
    fingerprint: () => Promise.resolve(null),
    storeFingerprintForResuming: false,
    removeFingerprintOnSuccess: false,
    ...hooks,
  }
  if (args.chunkSize != null) options.chunkSize = args.chunkSize
  if (args.retryDelays !== undefined) options.retryDelays = args.retryDelays
  return options
}

function errorStatus(err) {
  const res = err?.originalResponse
  return res ? res.getStatus() : null
}

function traceResponse(req, res) {
  const text = (value) => (value == null ? null : String(value))
  emit({
    event: 'response',
    method: req.getMethod(),
    url: req.getURL(),
    status: res.getStatus(),
    requestOffset: text(req.getHeader('Upload-Offset')),
    responseOffset: text(res.getHeader('Upload-Offset')),
    upstreamStatus: text(res.getHeader('Shim-Upstream-Status')),
    upstreamLocation: text(res.getHeader('Shim-Upstream-Location')),
  })
}

function main() {
  const args = parseArgs()
  let fileSize
  try {
    fileSize = statSync(args.file).size
  } catch (err) {
    fail(`cannot read file: ${err.message}`, null, 2)
  }
  const report = progressReporter(fileSize)
  let lastUrl = null
  let upload = null
  let stopping = false
  const hooks = {
    onUploadUrlAvailable() {
      if (upload.url !== lastUrl) emit({ event: 'url', url: upload.url })
      lastUrl = upload.url
    },
    onProgress(sent, total) {
      report(sent, total)
      if (!stopping && args.stopAfterBytes != null && sent >= args.stopAfterBytes) {
        stopping = true
        upload.abort().finally(() => {
          emit({ event: 'aborted', url: upload.url, sent })
          process.exit(3)
        })
      }
    },
    onSuccess() {
      emit({ event: 'success', url: upload.url })
      process.exit(0)
    },
    onError(err) {
      fail(String(err?.message ?? err), errorStatus(err))
    },
  }
  if (args.traceResponses) hooks.onAfterResponse = traceResponse
  if (args.holdAfterBytes != null) {
    const at = args.holdAfterBytes
    hold = { at, reached: () => emit({ event: 'holding', url: upload.url, sent: at }) }
  }
  upload = new tus.Upload(createReadStream(args.file), buildOptions(args, fileSize, hooks))
  upload.start()
}

main()
