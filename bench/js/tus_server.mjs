// @tus/server with @tus/file-store, for bench/ingest.py (issue 12): the tus server a Node user
// would pick, as its README sets it up. Listens on 127.0.0.1, port 0, stores into DIRECTORY.
//
//   node bench/js/tus_server.mjs DIRECTORY PACKAGE_DIR
//
// PACKAGE_DIR is the folder whose node_modules has the packages (tests/js). Prints
// "listening at 127.0.0.1:PORT" once it accepts connections.
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const [directory, packageDir] = process.argv.slice(2)
const require = createRequire(join(packageDir, 'package.json'))
const load = (name) => import(pathToFileURL(require.resolve(name)).href)
const { Server } = await load('@tus/server')
const { FileStore } = await load('@tus/file-store')

const server = new Server({ path: '/files', datastore: new FileStore({ directory }) })
const listener = server.listen({ host: '127.0.0.1', port: 0 }, () => {
  console.log(`listening at 127.0.0.1:${listener.address().port}`)
})
