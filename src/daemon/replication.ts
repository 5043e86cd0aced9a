/**
 * The node's replication side: one gRPC server (the `Replication` stream service and the `Peer`
 * control service) on the node's replication endpoint, one `ReplicaController` per volume the
 * cluster file places on this node, and the registry the NBD server serves from.
 *
 * Volumes: each volume placed here is created in the local store if missing (a new replica starts
 * at epoch 0, Inconsistent unless this node is the configured primary of a volume it already
 * holds, e.g. one created before replication was configured). A local volume whose size differs
 * from the cluster file is not served (logged): resizing is a catalog operation (issue 5).
 * Volumes in the store that the cluster file does not mention are served unreplicated, as before.
 */
import type { AddressInfo } from 'node:net'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { Attachment, ExportInfo, ExportRegistry } from '../nbd/exports.js'
import { addPeerControlService, PeerControlClient } from '../replica/peer-control.js'
import type { PeerControlHandlers } from '../replica/peer-control.js'
import { newIncarnation, PeerLinkClient, PeerLinkServer } from '../replica/peer-link.js'
import type { PeerLinkClientOptions } from '../replica/peer-link.js'
import { ReplicaController } from '../replica/replica-controller.js'
import type { ReplicaStatus } from '../replica/replica-controller.js'
import type { NodeStore, ReplicaRecord } from '../replica/store.js'
import { WitnessSession } from '../replica/witness-session.js'
import { WitnessClient } from '../witness/witness-service.js'
import type { ClusterConfig, ClusterNode, ClusterVolume } from './cluster-config.js'
import { findNode, volumesOfNode } from './cluster-config.js'

export interface ReplicationOptions {
  nodeName: string
  config: ClusterConfig
  store: NodeStore
  log: Logger
  /** Test hooks and tuning for the links to peers. */
  link?: PeerLinkClientOptions
  roleWaitMs?: number
}

interface Peer {
  link: PeerLinkClient
  control: PeerControlClient
}

/** How often a node retries deleting a removed replica that clients still hold open. */
const retireRetryMs = 5000

export class Replication implements ExportRegistry {
  private readonly controllers = new Map<string, ReplicaController>()
  private readonly peers = new Map<string, Peer>()
  /** Volumes the cluster file places here that cannot be served (their size differs). */
  private readonly refused = new Set<string>()
  private readonly server: PeerLinkServer
  private address: AddressInfo | undefined
  /** The node's session with the witness, if the cluster file names one. */
  readonly witness: WitnessSession | undefined

  private readonly incarnation: Buffer
  /** The cluster as last applied (start, then each `reconcile`). */
  private config: ClusterConfig
  /** Volumes removed from this node whose replica is still to be deleted (clients attached). */
  private readonly retiring = new Set<string>()
  private reconciling: Promise<void> = Promise.resolve()
  private retireTimer: NodeJS.Timeout | undefined
  private closing = false

  private constructor(private readonly options: ReplicationOptions) {
    const incarnation = newIncarnation()
    this.server = new PeerLinkServer({
      incarnation,
      onStream: (hello, replies) => {
        const controller = this.controllers.get(hello.volume)
        if (controller === undefined) {
          return {
            type: 'reject',
            code: 'VOLUME_NOT_FOUND',
            message: `${options.nodeName} holds no replica of ${hello.volume}`,
            epoch: 0,
          }
        }
        return controller.onStream(hello, replies)
      },
    })
    const witnessAt = options.config.witness
    this.witness =
      witnessAt === undefined
        ? undefined
        : new WitnessSession({
            nodeName: options.nodeName,
            client: new WitnessClient(`${witnessAt.host}:${witnessAt.port}`),
            log: options.log.child('witness'),
          })
    this.incarnation = incarnation
    this.config = options.config
    for (const { volume, peer } of volumesOfNode(options.config, options.nodeName)) {
      this.addController(volume, peer)
    }
  }

  private addController(volume: ClusterVolume, peer: ClusterNode): void {
    const { options } = this
    const address = `${peer.replication.host}:${peer.replication.port}`
    let link = this.peers.get(peer.name)
    if (link === undefined) {
      const client = new PeerLinkClient(options.link)
      client.connect(address)
      link = { link: client, control: new PeerControlClient(address) }
      this.peers.set(peer.name, link)
    }
    const local = options.store.get(volume.name)
    if (local?.info.sizeBytes !== volume.sizeBytes) {
      // Not served at all: unreplicated it would take writes its peer never sees.
      this.refused.add(volume.name)
      return
    }
    this.controllers.set(
      volume.name,
      new ReplicaController(
        {
          nodeName: options.nodeName,
          peerName: peer.name,
          peerAddress: address,
          configuredPrimary: volume.primary,
          followTheWriter: volume.followTheWriter,
          volume: local,
          store: options.store,
          link: link.link,
          control: link.control,
          incarnation: this.incarnation,
          log: options.log,
          onLostQuorum: volume.onLostQuorum,
          resyncRateBytes: volume.resyncRateBytes,
          ...(this.witness === undefined ? {} : { witness: this.witness }),
          ...(options.roleWaitMs === undefined ? {} : { roleWaitMs: options.roleWaitMs }),
        },
        options.store.replica(volume.name) ?? initialRecord(volume.primary === options.nodeName),
      ),
    )
  }

  /**
   * Applies a newer cluster (the catalog changed): creates and starts the replicas newly placed
   * here, stops and deletes the ones no longer placed here (their clients' I/O fails from then;
   * the data goes once the last client detaches, retried on each call). Changes of a kept
   * volume's settings or of its peer's address take effect at the node's next start (logged).
   * One reconcile at a time, in call order.
   */
  reconcile(config: ClusterConfig): Promise<void> {
    const run = this.reconciling.then(() => this.applyConfig(config))
    this.reconciling = run.catch((error: unknown) => {
      this.options.log.error('cannot apply the cluster change', { error: errorMessage(error) })
    })
    return run
  }

  private async applyConfig(config: ClusterConfig): Promise<void> {
    const { nodeName, store, log } = this.options
    const before = new Map(
      volumesOfNode(this.config, nodeName).map((entry) => [entry.volume.name, entry]),
    )
    const after = volumesOfNode(config, nodeName)
    this.config = config
    for (const { volume, peer } of after) {
      const known = before.get(volume.name)
      if (known !== undefined && this.controllers.has(volume.name)) {
        if (JSON.stringify(known) !== JSON.stringify({ volume, peer })) {
          log.warn('a volume setting changed; it applies when this node restarts', {
            volume: volume.name,
          })
        }
        continue
      }
      if (this.retiring.has(volume.name)) continue // deleted and created again: after the delete
      await ensureReplica(store, volume, log)
      this.refused.delete(volume.name)
      this.addController(volume, peer)
      this.controllers.get(volume.name)?.start()
      log.info('replica added', { volume: volume.name, peer: peer.name })
    }
    const kept = new Set(after.map((entry) => entry.volume.name))
    for (const name of before.keys()) {
      if (kept.has(name)) continue
      const controller = this.controllers.get(name)
      this.controllers.delete(name)
      this.refused.add(name) // no new client attaches
      await controller?.close()
      this.retiring.add(name)
      log.info('replica removed from this node', { volume: name })
    }
    for (const name of [...this.retiring]) {
      try {
        if (store.get(name) !== undefined) await store.delete(name)
        this.retiring.delete(name)
        this.refused.delete(name)
        log.info('replica deleted, space freed', { volume: name })
      } catch (error) {
        log.warn('replica not deleted yet', { volume: name, error: errorMessage(error) })
      }
    }
    // Clients still attached: try again later (and then add a volume created again meanwhile).
    if (this.retiring.size > 0 && !this.closing && this.retireTimer === undefined) {
      this.retireTimer = setTimeout(() => {
        this.retireTimer = undefined
        void this.reconcile(this.config)
      }, retireRetryMs)
      this.retireTimer.unref()
    }
  }

  /** Volumes removed from this node whose data is not deleted yet (clients still attached). */
  get retiringVolumes(): string[] {
    return [...this.retiring]
  }

  /** Creates missing replicas, listens on this node's replication endpoint, starts every volume. */
  static async start(options: ReplicationOptions): Promise<Replication> {
    const { config, nodeName, store, log } = options
    const self = findNode(config, nodeName)
    if (self === undefined) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `node ${nodeName} is not in the cluster file (nodes: ${config.nodes.map((n) => n.name).join(', ')})`,
      )
    }
    for (const { volume } of volumesOfNode(config, nodeName)) {
      await ensureReplica(store, volume, log)
    }
    const replication = new Replication(options)
    await addPeerControlService(replication.server.grpcServer, replication.handlers(), log)
    const port = await replication.server.listen(self.replication.host, self.replication.port)
    replication.address = {
      address: self.replication.host,
      family: self.replication.host.includes(':') ? 'IPv6' : 'IPv4',
      port,
    }
    replication.witness?.start()
    for (const controller of replication.controllers.values()) controller.start()
    return replication
  }

  get replicationAddress(): AddressInfo | undefined {
    return this.address
  }

  status(): ReplicaStatus[] {
    return [...this.controllers.values()].map((controller) => controller.status())
  }

  controller(volume: string): ReplicaController | undefined {
    return this.controllers.get(volume)
  }

  // ExportRegistry: replicated volumes through their controller, the others straight from the store.

  list(): ExportInfo[] {
    return this.options.store.list().filter((info) => !this.refused.has(info.name))
  }

  find(name: string): ExportInfo | undefined {
    return this.refused.has(name) ? undefined : this.options.store.find(name)
  }

  attach(name: string): Attachment | undefined {
    if (this.refused.has(name)) return undefined
    const attachment = this.options.store.attach(name)
    const controller = this.controllers.get(name)
    if (attachment === undefined || controller === undefined) return attachment
    return {
      device: controller,
      detach: () => {
        attachment.detach()
      },
    }
  }

  /** Stops every controller (pending requests fail), says Goodbye on every stream. */
  async close(): Promise<void> {
    this.closing = true
    clearTimeout(this.retireTimer)
    await this.reconciling
    const results = await Promise.allSettled(
      [...this.controllers.values()].map((controller) => controller.close()),
    )
    for (const peer of this.peers.values()) {
      peer.link.close()
      peer.control.close()
    }
    this.witness?.close()
    await this.server.close()
    for (const result of results) {
      if (result.status === 'rejected') {
        this.options.log.error('a volume did not close cleanly', {
          error: errorMessage(result.reason),
        })
      }
    }
  }

  private handlers(): PeerControlHandlers {
    const find = (volume: string): ReplicaController => {
      const controller = this.controllers.get(volume)
      if (controller === undefined) {
        throw new DuplexError(
          'VOLUME_NOT_FOUND',
          `${this.options.nodeName} holds no replica of ${volume}`,
        )
      }
      return controller
    }
    return {
      describe: (volume) => Promise.resolve().then(() => find(volume).describe()),
      renewLease: (request) =>
        Promise.resolve().then(() => find(request.volume).renewLease(request)),
      checksum: (request) => Promise.resolve().then(() => find(request.volume).checksum(request)),
      repair: (request) => Promise.resolve().then(() => find(request.volume).repair(request)),
      forward: (request) =>
        Promise.resolve().then(() => find(request.volume).serveForwarded(request)),
      handover: (request) => Promise.resolve().then(() => find(request.volume).handover(request)),
      promote: (request) =>
        Promise.resolve().then(() => find(request.volume).promote(request.force === true)),
      resolve: (request) => Promise.resolve().then(() => find(request.volume).resolve(request)),
      syncComplete: (request) =>
        Promise.resolve().then(() => find(request.volume).syncComplete(request)),
    }
  }
}

/** Creates the local replica of a volume placed here if it is missing. */
async function ensureReplica(store: NodeStore, volume: ClusterVolume, log: Logger): Promise<void> {
  const existing = store.get(volume.name)
  if (existing === undefined) {
    await store.create(volume.name, volume.sizeBytes)
    await store.setReplica(volume.name, initialRecord(false))
    log.info('created a new replica', { volume: volume.name, bytes: volume.sizeBytes })
  } else if (existing.info.sizeBytes !== volume.sizeBytes) {
    log.error('replica size differs from the cluster; not serving it', {
      volume: volume.name,
      local: existing.info.sizeBytes,
      cluster: volume.sizeBytes,
    })
  }
}

/**
 * The record of a replica that never joined a pair. A volume that existed on the configured
 * primary before replication was configured keeps its data: it counts as UpToDate.
 */
function initialRecord(configuredPrimaryWithData: boolean): ReplicaRecord {
  return { epoch: 0, primary: '', state: configuredPrimaryWithData ? 'UpToDate' : 'Inconsistent' }
}
