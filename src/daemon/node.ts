/**
 * `duplex node`: the storage daemon's composition root. Opens the node's store (which locks the
 * data directory), serves its volumes over NBD, answers the local admin socket, and exposes
 * /metrics. `stop` is the clean shutdown SIGTERM triggers: stop accepting, finish in-flight
 * requests, flush every volume, close the store.
 */
import type { AddressInfo } from 'node:net'
import { Gauge, Registry, collectDefaultMetrics } from 'prom-client'
import type { Logger } from '../core/log.js'
import { NbdServer } from '../nbd/server.js'
import type { BlockSizes } from '../nbd/handshake.js'
import { NodeStore } from '../replica/store.js'
import { AdminSocketServer, adminSocketPath, performAdminRequest } from './admin-socket.js'
import { MetricsServer } from '../metrics/http.js'

export interface NodeOptions {
  name: string
  dataDir: string
  listen: { host: string; port: number }
  metricsListen?: { host: string; port: number }
  blockSizes?: BlockSizes
  log: Logger
}

export interface RunningNode {
  nbdAddress: AddressInfo
  metricsAddress: AddressInfo | undefined
  stop(): Promise<void>
}

export async function startNode(options: NodeOptions): Promise<RunningNode> {
  const { log } = options
  const store = await NodeStore.open(options.dataDir)
  const nbd = new NbdServer({
    registry: store,
    log: log.child('nbd'),
    ...(options.blockSizes === undefined ? {} : { blockSizes: options.blockSizes }),
  })
  const admin = new AdminSocketServer(
    {
      handle: (request) => performAdminRequest(store, request),
    },
    log.child('admin'),
  )
  const registry = new Registry()
  registry.setDefaultLabels({ node: options.name })
  collectDefaultMetrics({ register: registry })
  new Gauge({
    name: 'duplex_nbd_connections',
    help: 'NBD client connections open on this node',
    registers: [registry],
    collect() {
      this.set(nbd.connectionCount)
    },
  })
  const metrics = new MetricsServer(registry, log.child('metrics'))

  let nbdAddress: AddressInfo
  let metricsAddress: AddressInfo | undefined
  try {
    nbdAddress = await nbd.listen(options.listen.host, options.listen.port)
    await admin.listen(adminSocketPath(options.dataDir))
    if (options.metricsListen !== undefined) {
      metricsAddress = await metrics.listen(options.metricsListen.host, options.metricsListen.port)
    }
  } catch (error) {
    await nbd.close()
    await store.close()
    throw error
  }

  let stopping: Promise<void> | undefined
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      log.info('stopping: finishing in-flight requests')
      await nbd.close()
      await admin.close()
      if (metricsAddress !== undefined) await metrics.close()
      await store.close()
      log.info('stopped cleanly')
    })()
    return stopping
  }
  return { nbdAddress, metricsAddress, stop }
}
