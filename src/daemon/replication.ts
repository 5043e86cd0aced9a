/**
 * The node's replication side: one gRPC server (the `Replication` stream service and the `Peer`
 * control service) on the node's replication endpoint, one `ReplicaController` per volume the
 * cluster file places on this node, and the registry the NBD server serves from.
 *
 * Volumes: each volume placed here is created in the local store if missing (a new replica starts
 * at epoch 0, Inconsistent unless this node is the configured primary of a volume it already
 * holds, e.g. one created before replication was configured). A local volume smaller than the
 * cluster says grows (`duplex volume resize`, applied when no client has it open); one of
 * another size is not served (logged).
 * Volumes in the store that the cluster file does not mention are served unreplicated, as before.
 */
import type { AddressInfo } from 'node:net'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { TlsCredentials } from '../core/tls.js'
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
import { accessRefusal, findNode, volumesMovingTo, volumesOfNode } from './cluster-config.js'
import { bootId } from '../core/boot-id.js'
import type {
  MoveAdoptReply,
  MoveAdoptRequest,
  MoveBeginRequest,
  MoveWriteRequest,
} from '../replica/peer-control.js'
import type { PeerEndpoint } from '../replica/replica-controller.js'
import { MoveSource } from './mover.js'

export interface ReplicationOptions {
  nodeName: string
  config: ClusterConfig
  store: NodeStore
  log: Logger
  /** Cluster TLS: mutual TLS with the witness and the peers; plaintext if undefined. */
  tls?: TlsCredentials
  /** Test hooks and tuning for the links to peers. */
  link?: PeerLinkClientOptions
  roleWaitMs?: number
  /** Each replicated op's round trip to the peer (metrics). */
  onPeerRoundTrip?: (volume: string, seconds: number) => void
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
  /** Volumes the catalog grew whose replica here waits for its clients to detach. */
  private readonly growing = new Set<string>()
  /** Replicas being moved here (not served, not replicated): the copy from the source lands. */
  private readonly incoming = new Map<string, { from: string; sizeBytes: number; begun: boolean }>()
  /** This node's replicas being moved away: their copiers, by volume. */
  private readonly movers = new Map<string, MoveSource>()
  private reconciling: Promise<void> = Promise.resolve()
  private retireTimer: NodeJS.Timeout | undefined
  private closing = false

  private constructor(private readonly options: ReplicationOptions) {
    const incarnation = newIncarnation()
    const { tls } = options
    this.server = new PeerLinkServer({
      incarnation,
      ...(tls === undefined ? {} : { credentials: tls.serverCredentials(), secure: true }),
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
            client: new WitnessClient(
              `${witnessAt.host}:${witnessAt.port}`,
              tls === undefined ? {} : { credentials: tls.channelCredentials({ role: 'witness' }) },
            ),
            log: options.log.child('witness'),
          })
    this.incarnation = incarnation
    this.config = options.config
    for (const { volume, peer } of volumesOfNode(options.config, options.nodeName)) {
      this.addController(volume, peer)
    }
  }

  /** The clients to a node (one stream client and one control channel per node, shared). */
  private peerEndpoint(peer: ClusterNode): PeerEndpoint {
    const address = `${peer.replication.host}:${peer.replication.port}`
    let link = this.peers.get(peer.name)
    if (link === undefined) {
      const { tls } = this.options
      const credentials = tls?.channelCredentials({ role: 'node', name: peer.name })
      const secured = credentials === undefined ? {} : { credentials }
      const client = new PeerLinkClient({ ...this.options.link, ...secured })
      client.connect(address)
      link = { link: client, control: new PeerControlClient(address, secured) }
      this.peers.set(peer.name, link)
    }
    return { name: peer.name, address, link: link.link, control: link.control }
  }

  private addController(volume: ClusterVolume, peer: ClusterNode): void {
    const { options } = this
    const { address, ...link } = this.peerEndpoint(peer)
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
          ...(options.onPeerRoundTrip === undefined
            ? {}
            : {
                onPeerRoundTrip: (seconds: number) =>
                  options.onPeerRoundTrip?.(volume.name, seconds),
              }),
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
      const controller = this.controllers.get(volume.name)
      if (known !== undefined && controller !== undefined) {
        if (volume.sizeBytes !== controller.info.sizeBytes) {
          await this.growReplica(controller, volume, peer)
          continue
        }
        if (controller.peerName !== peer.name) {
          log.warn('the peer of a volume changed; it applies when this node restarts', {
            volume: volume.name,
            peer: peer.name,
          })
        } else if (
          JSON.stringify(settingsOf(known.volume)) !== JSON.stringify(settingsOf(volume))
        ) {
          log.warn('a volume setting changed; it applies when this node restarts', {
            volume: volume.name,
          })
        }
        continue
      }
      if (this.retiring.has(volume.name)) continue // deleted and created again: after the delete
      this.incoming.delete(volume.name) // a move here completed: the copy is the replica now
      await ensureReplica(store, volume, log)
      this.refused.delete(volume.name)
      this.addController(volume, peer)
      this.controllers.get(volume.name)?.start()
      log.info('replica added', { volume: volume.name, peer: peer.name })
    }
    const kept = new Set(after.map((entry) => entry.volume.name))
    await this.applyMoves(config, kept)
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
    const later = this.retiring.size > 0 || this.growing.size > 0
    if (later && !this.closing && this.retireTimer === undefined) {
      this.retireTimer = setTimeout(() => {
        this.retireTimer = undefined
        void this.reconcile(this.config)
      }, retireRetryMs)
      this.retireTimer.unref()
    }
  }

  /**
   * The catalog grew a volume (`duplex volume resize`). A client sized its view of the volume at
   * its handshake, so the replica grows only while no client has it open here: until then it is
   * served at its old size and the change waits (retried with the deletions). Then the replica
   * stops, grows (the new bytes read as zeros on both nodes: identical), and starts again; it
   * pairs with its peer once the peer has grown too (until then it waits, as for any size
   * mismatch).
   */
  private async growReplica(
    controller: ReplicaController,
    volume: ClusterVolume,
    peer: ClusterNode,
  ): Promise<void> {
    const { store, log } = this.options
    const name = volume.name
    if (store.attachmentCount(name) > 0) {
      if (!this.growing.has(name)) {
        log.warn('the volume grew in the catalog; it grows here once its clients detach', {
          volume: name,
          clients: store.attachmentCount(name),
          bytes: volume.sizeBytes,
        })
      }
      this.growing.add(name)
      return
    }
    this.refused.add(name) // no client attaches meanwhile
    this.controllers.delete(name)
    try {
      await controller.close()
      await store.grow(name, volume.sizeBytes)
      this.growing.delete(name)
      log.info('replica grown', { volume: name, bytes: volume.sizeBytes })
    } catch (error) {
      log.error('cannot grow the replica; it keeps its size', {
        volume: name,
        error: errorMessage(error),
      })
    } finally {
      this.refused.delete(name)
      this.addController(volume, peer)
      this.controllers.get(name)?.start()
    }
  }

  /**
   * Starts the copiers of this node's replicas that move away and stops those whose move ended;
   * keeps the volumes moving here apart (not served) and deletes the copies of moves that were
   * cancelled.
   */
  private async applyMoves(config: ClusterConfig, kept: ReadonlySet<string>): Promise<void> {
    const { nodeName, store, log } = this.options
    const leaving = new Map(
      config.volumes
        .filter((volume) => volume.move?.from === nodeName && kept.has(volume.name))
        .map((volume) => [volume.name, volume]),
    )
    for (const [name, mover] of [...this.movers]) {
      if (leaving.get(name)?.move?.to === mover.toNode) continue
      this.movers.delete(name)
      await mover.stop()
    }
    for (const [name, volume] of leaving) {
      const controller = this.controllers.get(name)
      const local = store.get(name)
      const to = volume.move === undefined ? undefined : findNode(config, volume.move.to)
      if (this.movers.has(name) || controller === undefined || local === undefined || !to) continue
      const mover = new MoveSource({
        nodeName,
        toNode: to.name,
        local,
        controller,
        target: this.peerEndpoint(to).control,
        peerControl: () => {
          const peer = findNode(this.config, controller.peerName)
          if (peer === undefined) {
            throw new DuplexError('UNAVAILABLE', `${controller.peerName} is not in the cluster`)
          }
          return this.peerEndpoint(peer).control
        },
        rateBytes: volume.resyncRateBytes,
        log: log.child('move'),
      })
      this.movers.set(name, mover)
      mover.start()
    }
    const arriving = new Map(volumesMovingTo(config, nodeName).map((v) => [v.name, v]))
    for (const [name, volume] of arriving) {
      const from = volume.move?.from ?? ''
      const known = this.incoming.get(name)
      if (known?.from === from) continue
      this.incoming.set(name, { from, sizeBytes: volume.sizeBytes, begun: false })
      this.refused.add(name)
      log.info('a replica is moving here', { volume: name, from })
    }
    for (const name of [...this.incoming.keys()]) {
      if (arriving.has(name) || kept.has(name)) continue
      this.incoming.delete(name) // cancelled, or the volume deleted: drop the partial copy
      this.retiring.add(name)
    }
  }

  /** The move of this node's replica away, if one runs: its state and progress. */
  moveOf(volume: string): MoveSource | undefined {
    return this.movers.get(volume)
  }

  private incomingCopy(volume: string, fromNode: string): { sizeBytes: number; begun: boolean } {
    const entry = this.incoming.get(volume)
    if (entry === undefined || entry.from !== fromNode) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `the catalog does not move ${volume} from ${fromNode} to ${this.options.nodeName}`,
      )
    }
    return entry
  }

  /** Target of a move: start over with an empty replica. */
  private async moveBegin(request: MoveBeginRequest): Promise<void> {
    const { store, log } = this.options
    const entry = this.incomingCopy(request.volume, request.fromNode)
    if (request.sizeBytes !== entry.sizeBytes) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `${request.volume} is ${entry.sizeBytes} bytes in the catalog, not ${request.sizeBytes}`,
      )
    }
    entry.begun = false
    if (store.get(request.volume) !== undefined) await store.delete(request.volume)
    await store.create(request.volume, entry.sizeBytes)
    await store.setReplica(request.volume, initialRecord(false))
    entry.begun = true
    log.info('receiving a moving replica', { volume: request.volume, from: request.fromNode })
  }

  private targetVolume(
    volume: string,
    fromNode: string,
  ): NonNullable<ReturnType<NodeStore['get']>> {
    const entry = this.incomingCopy(volume, fromNode)
    const local = this.options.store.get(volume)
    if (!entry.begun || local === undefined) {
      throw new DuplexError('FAILED_PRECONDITION', `no copy of ${volume} has begun here`)
    }
    return local
  }

  private async moveWrite(request: MoveWriteRequest): Promise<void> {
    const local = this.targetVolume(request.volume, request.fromNode)
    const { offset, length } = request
    if (offset + length > local.info.sizeBytes) {
      throw new DuplexError(
        'OUT_OF_RANGE',
        `${length} bytes at ${offset} are beyond ${request.volume}`,
      )
    }
    if (request.hole) await local.trim(offset, length, false)
    else await local.write(offset, request.data, false)
  }

  /** The copy is complete: durable, then it takes the source's record (not served until placed). */
  private async moveAdopt(request: MoveAdoptRequest): Promise<MoveAdoptReply> {
    const local = this.targetVolume(request.volume, request.fromNode)
    await local.flush()
    await this.options.store.setReplica(request.volume, {
      epoch: request.epoch,
      primary: request.primary,
      state: request.state,
      history: request.history,
    })
    this.options.log.info('moved replica complete here; it joins when the witness records it', {
      volume: request.volume,
    })
    return { bootId }
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
    await replication.applyMoves(
      config,
      new Set(volumesOfNode(config, nodeName).map((entry) => entry.volume.name)),
    )
    await addPeerControlService(
      replication.server.grpcServer,
      replication.handlers(),
      log,
      options.tls !== undefined,
    )
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

  /** A volume's access list (catalog `volume access`): who may open it over NBD. */
  refuse(
    name: string,
    client: { address: string; certificateName: string | undefined },
  ): string | undefined {
    const volume = this.config.volumes.find((each) => each.name === name)
    return volume === undefined ? undefined : accessRefusal(volume, client)
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
    await Promise.allSettled([...this.movers.values()].map((mover) => mover.stop()))
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
      describe: (volume) =>
        Promise.resolve()
          .then(() => find(volume).describe())
          .then((reply) => {
            const move = this.movers.get(volume)?.progress()
            if (move === undefined) return reply
            return { ...reply, moveBytesDone: move.done, moveBytesTotal: move.total }
          }),
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
      moveBegin: (request) => this.moveBegin(request),
      moveWrite: (request) => this.moveWrite(request),
      moveAdopt: (request) => this.moveAdopt(request),
      moveCutover: (request) =>
        Promise.resolve().then(() => {
          const target = findNode(this.config, request.toNode)
          const moving = this.config.volumes.find((volume) => volume.name === request.volume)
          if (
            target === undefined ||
            moving?.move?.from !== request.fromNode ||
            moving.move.to !== request.toNode
          ) {
            // Done already (a retry after the catalog changed) is the controller's to answer.
            const controller = find(request.volume)
            if (controller.peerName === request.toNode) return { epoch: controller.status().epoch }
            throw new DuplexError(
              'FAILED_PRECONDITION',
              `the catalog does not move ${request.volume} from ${request.fromNode} to ${request.toNode}`,
            )
          }
          return find(request.volume).moveCutover(request, this.peerEndpoint(target))
        }),
      moveFinish: (request) =>
        Promise.resolve().then(() => {
          const mover = this.movers.get(request.volume)
          if (mover === undefined) {
            throw new DuplexError(
              'FAILED_PRECONDITION',
              `${this.options.nodeName} is not moving its replica of ${request.volume}`,
            )
          }
          return mover.finish(request)
        }),
    }
  }
}

/** What of a volume's configuration a running replica uses (not its placement). */
function settingsOf(volume: ClusterVolume): unknown {
  const { sizeBytes, followTheWriter, onLostQuorum, resyncRateBytes } = volume
  return { sizeBytes, followTheWriter, onLostQuorum, resyncRateBytes }
}

/** Creates the local replica of a volume placed here if it is missing. */
async function ensureReplica(store: NodeStore, volume: ClusterVolume, log: Logger): Promise<void> {
  const existing = store.get(volume.name)
  if (existing === undefined) {
    await store.create(volume.name, volume.sizeBytes)
    await store.setReplica(volume.name, initialRecord(false))
    log.info('created a new replica', { volume: volume.name, bytes: volume.sizeBytes })
  } else if (
    existing.info.sizeBytes < volume.sizeBytes &&
    store.attachmentCount(volume.name) === 0
  ) {
    await store.grow(volume.name, volume.sizeBytes)
    log.info('replica grown to the size in the catalog', {
      volume: volume.name,
      bytes: volume.sizeBytes,
    })
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
