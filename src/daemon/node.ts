/**
 * `duplex node`: the storage daemon's composition root. Opens the node's store (which locks the
 * data directory), serves its volumes over NBD, answers the local admin socket, and exposes
 * /metrics. `stop` is the clean shutdown SIGTERM triggers: stop accepting, finish in-flight
 * requests, flush every volume, close the store.
 */
import type { AddressInfo } from 'node:net'
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client'
import type { Logger } from '../core/log.js'
import { NbdServer } from '../nbd/server.js'
import type { BlockSizes } from '../nbd/handshake.js'
import { NodeStore } from '../replica/store.js'
import { AdminSocketServer, adminSocketPath, performAdminRequest } from './admin-socket.js'
import { MetricsServer } from '../metrics/http.js'
import type { ClusterConfig } from './cluster-config.js'
import { Replication } from './replication.js'
import { replicationCodes } from '../replica/replication-types.js'
import type { ReplicationOptions } from './replication.js'

export interface NodeOptions {
  name: string
  dataDir: string
  listen: { host: string; port: number }
  metricsListen?: { host: string; port: number }
  blockSizes?: BlockSizes
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
  const store = await NodeStore.open(options.dataDir)
  let replication: Replication | undefined
  try {
    if (options.cluster !== undefined) {
      replication = await Replication.start({
        nodeName: options.name,
        config: options.cluster,
        store,
        log: log.child('replication'),
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

/** Per-volume replication health, read from the controllers at scrape time. */
function registerReplicationMetrics(registry: Registry, replication: Replication): void {
  const roles = ['starting', 'primary', 'secondary', 'closed'] as const
  new Gauge({
    name: 'duplex_replica_role',
    help: "The role of this node's replica of a volume (1 for the current role)",
    labelNames: ['volume', 'role'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        for (const role of roles)
          this.set({ volume: status.volume, role }, status.role === role ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_epoch',
    help: 'The epoch this replica is in',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) this.set({ volume: status.volume }, status.epoch)
    },
  })
  new Gauge({
    name: 'duplex_replica_up_to_date',
    help: '1 if this replica is UpToDate, 0 while it is Inconsistent (being filled)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.state === 'UpToDate' ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replication_peer_connected',
    help: 'Primary only: 1 while the replication stream to the peer is open',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        if (status.role === 'primary')
          this.set({ volume: status.volume }, status.peerConnected ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replication_sync_remaining_bytes',
    help: 'Primary only: bytes of the running sync to the peer not yet copied',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        const remaining =
          status.peer === 'syncing' ? status.syncBytesTotal - status.syncBytesDone : 0
        this.set({ volume: status.volume }, remaining)
      }
    },
  })
  // Op and flush refusals, plus the Hello refusal a primary gets from a node that is not its
  // secondary (WRONG_SENDER and EPOCH_STALE count for Hellos too).
  const codes = [...replicationCodes, 'NOT_SECONDARY']
  new Counter({
    name: 'duplex_replication_rejected_messages_total',
    help: 'Replication messages this replica refused (never applied), by reason',
    labelNames: ['volume', 'code'],
    registers: [registry],
    collect() {
      // The controllers hold the running totals; the counter mirrors them at each scrape.
      this.reset()
      for (const status of replication.status()) {
        for (const code of codes)
          this.inc({ volume: status.volume, code }, status.rejected[code] ?? 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_degraded',
    help: 'Primary only: 1 while it runs alone by a witness grant (its peer lacks writes)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.degraded ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_quorum_lost',
    help: '1 while this replica may not serve (on-lost-quorum applies)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.quorumLost === undefined ? 0 : 1)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_split_brain',
    help: "1 while this replica's history forks from its peer's: no automatic resync",
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.splitBrain === undefined ? 0 : 1)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_dirty_bytes',
    help: 'Bytes the peer lacks: regions written while running alone, not yet resynced',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status())
        this.set({ volume: status.volume }, status.dirtyBytes)
    },
  })
  new Counter({
    name: 'duplex_replication_resync_bytes_total',
    help: 'Bytes copied to the peer by initial syncs and resyncs',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status())
        this.inc({ volume: status.volume }, status.resyncBytes)
    },
  })
  if (replication.witness !== undefined) {
    const witness = replication.witness
    new Gauge({
      name: 'duplex_witness_reachable',
      help: "1 while the witness answers this node's heartbeats",
      registers: [registry],
      collect() {
        this.set(witness.reachable ? 1 : 0)
      },
    })
    new Gauge({
      name: 'duplex_witness_lease_remaining_seconds',
      help: "Seconds left on this node's witness lease (by its own clock)",
      registers: [registry],
      collect() {
        this.set(witness.leaseRemainingMs() / 1000)
      },
    })
  }
  new Counter({
    name: 'duplex_replication_forwarded_writes_total',
    help: 'Primary only: writes forwarded by the peer node for its clients',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status()) {
        this.inc({ volume: status.volume }, status.forwardedWrites)
      }
    },
  })
}
