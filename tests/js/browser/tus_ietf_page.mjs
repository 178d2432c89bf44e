// A page that uploads the picked file with tus-js-client speaking the IETF draft
// (protocol 'ietf-draft-05', interop version 6), as a site on another origin than the shim
// would. Query: ?endpoint=<URL the file is uploaded to>.

import * as tus from 'tus-js-client'

import { RETRY_DELAYS, emit, onFilePicked, params } from './report.mjs'

onFilePicked((file) => {
  const upload = new tus.Upload(file, {
    endpoint: params.get('endpoint'),
    protocol: 'ietf-draft-05',
    metadata: { filename: file.name },
    retryDelays: RETRY_DELAYS,
    onShouldRetry: (error, attempt) => {
      emit({ event: 'retry', attempt, message: String(error) })
      return true
    },
    onProgress: (sent, total) => emit({ event: 'progress', sent, total }),
    onSuccess: () => emit({ event: 'success', url: upload.url }),
    onError: (error) => emit({ event: 'error', message: String(error) }),
  })
  upload.start()
})
