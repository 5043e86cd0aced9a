/**
 * `duplex node`: the storage daemon's composition root. Opens the node's store (which locks the
 * data directory), serves its volumes over NBD, answers the local admin socket, and exposes
 * /metrics. `stop` is the clean shutdown SIGTERM triggers: stop accepting, finish in-flight
 * requests, flush every volume, close the store.
 */
import type { AddressInfo } from 'node:net'
import { Gauge, Registry } from 'prom-client'
import type { Logger } from '../core/log.js'
import type { TlsCredentials } from '../core/tls.js'
import { NbdServer } from '../nbd/server.js'
import type { NbdTlsOptions } from '../nbd/server.js'
import type { BlockSizes } from '../nbd/handshake.js'
import { NodeStore } from '../replica/store.js'
import { AdminSocketServer, adminSocketPath, performAdminRequest } from './admin-socket.js'
import {
  MetricsServer,
  registerCertificateMetrics,
  registerProcessMetrics,
} from '../metrics/http.js'
import type { ClusterConfig } from './cluster-config.js'
import { Replication } from './replication.js'
import { IoMetrics } from '../metrics/io-metrics.js'
import {
  peerRoundTripHistogram,
  registerReplicationMetrics,
} from '../metrics/replication-metrics.js'
import type { ReplicationOptions } from './replication.js'

export interface NodeOptions {
  name: string
  dataDir: string
  listen: { host: string; port: number }
  metricsListen?: { host: string; port: number }
  blockSizes?: BlockSizes
  /** NBD over TLS (STARTTLS), see NbdTlsOptions. */
  tls?: NbdTlsOptions
  /** Cluster TLS: mutual TLS with the witness and the peers (src/core/tls.ts). */
  clusterTls?: TlsCredentials
  /** The NBD certificate's files, for the expiry metric. */
  nbdCertificate?: TlsCredentials
  /** Replicate the volumes this cluster file places on this node (see cluster-config.ts). */
  cluster?: ClusterConfig
  /** Tuning and test hooks for replication. */
  replication?: Pick<ReplicationOptions, 'link' | 'roleWaitMs'>
  log: Logger
}

export interface RunningNode {
  nbdAddress: AddressInfo
  metricsAddress: AddressInfo | undefined
  replicationAddress: AddressInfo | undefined
  replication: Replication | undefined
  stop(): Promise<void>
}

export async function startNode(options: NodeOptions): Promise<RunningNode> {
  const { log } = options
  const registry = new Registry()
  registry.setDefaultLabels({ node: options.name })
  registerProcessMetrics(registry)
  registerCertificateMetrics(registry, [
    ...(options.clusterTls === undefined
      ? []
      : [{ purpose: 'cluster' as const, credentials: options.clusterTls }]),
    ...(options.nbdCertificate === undefined
      ? []
      : [{ purpose: 'nbd' as const, credentials: options.nbdCertificate }]),
  ])
  const roundTrips = peerRoundTripHistogram(registry)
  const store = await NodeStore.open(options.dataDir)
  let replication: Replication | undefined
  try {
    if (options.cluster !== undefined) {
      replication = await Replication.start({
        nodeName: options.name,
        config: options.cluster,
        store,
        log: log.child('replication'),
        ...(options.clusterTls === undefined ? {} : { tls: options.clusterTls }),
        onPeerRoundTrip: (volume, seconds) => {
          roundTrips.observe({ volume }, seconds)
        },
        ...options.replication,
      })
    }
  } catch (error) {
    await store.close()
    throw error
  }
  const nbd = new NbdServer({
    registry: replication ?? store,
    log: log.child('nbd'),
    observer: new IoMetrics(registry, () => (replication ?? store).list().map((v) => v.name)),
    ...(options.blockSizes === undefined ? {} : { blockSizes: options.blockSizes }),
    ...(options.tls === undefined ? {} : { tls: options.tls }),
  })
  const admin = new AdminSocketServer(
    {
      handle: (request) => performAdminRequest(store, request),
    },
    log.child('admin'),
  )
  new Gauge({
    name: 'duplex_nbd_connections',
    help: 'NBD client connections open on this node',
    registers: [registry],
    collect() {
      this.set(nbd.connectionCount)
    },
  })
  if (replication !== undefined) registerReplicationMetrics(registry, replication)
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
    await replication?.close()
    await store.close()
    throw error
  }

  let stopping: Promise<void> | undefined
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      log.info('stopping: finishing in-flight requests')
      await nbd.close()
      await replication?.close()
      await admin.close()
      if (metricsAddress !== undefined) await metrics.close()
      await store.close()
      log.info('stopped cleanly')
    })()
    return stopping
  }
  return {
    nbdAddress,
    metricsAddress,
    replicationAddress: replication?.replicationAddress,
    replication,
    stop,
  }
}
