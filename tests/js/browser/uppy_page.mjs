// A page that uploads the picked file with Uppy (@uppy/core) and its Tus plugin (@uppy/tus),
// as a site on another origin than the shim would. Query: ?endpoint=<tus creation URL>.

import Uppy from '@uppy/core'
import Tus from '@uppy/tus'

import { RETRY_DELAYS, emit, onFilePicked, params } from './report.mjs'

const uppy = new Uppy({ autoProceed: false })
uppy.use(Tus, {
  endpoint: params.get('endpoint'),
  retryDelays: RETRY_DELAYS,
  onShouldRetry: (error, attempt, options, next) => {
    emit({ event: 'retry', attempt, message: String(error) })
    return next(error)
  },
})
uppy.on('upload-progress', (file, progress) => {
  emit({ event: 'progress', sent: progress.bytesUploaded, total: progress.bytesTotal })
})

onFilePicked(async (file) => {
  uppy.addFile({ name: file.name, type: file.type || 'application/octet-stream', data: file })
  try {
    const result = await uppy.upload()
    if (result.failed.length > 0) {
      emit({ event: 'error', message: String(result.failed[0].error) })
    } else {
      emit({ event: 'success', url: result.successful[0].uploadURL })
    }
  } catch (error) {
    emit({ event: 'error', message: String(error) })
  }
})
