/**
 * One replicated volume on one node: decides and changes the replica's role, and is the
 * `BlockDevice` this node's NBD clients use, whatever the role.
 *
 * Roles (see roles.ts for how a start picks one):
 * - primary: client writes go through a `PrimaryVolume` (acknowledged once both replicas have
 *   them); reads are local. Writes the peer forwards are served the same way.
 * - secondary: a `SecondaryVolume` applies the primary's stream; client writes, trims, zeroes and
 *   flushes are forwarded to the primary (same acknowledgement rule); reads are local while this
 *   replica is UpToDate, forwarded while it is Inconsistent (being filled by the initial sync).
 *
 * Role changes hold new client requests at the door (`gated`) and let the ones inside finish:
 * - handover (`promote` on the target, `handover` on the current primary): the primary drains,
 *   flushes both replicas, records `epoch + 1` with the target as primary and becomes its
 *   secondary; the target records the same and starts as primary. No client is disconnected.
 * - follow the writer: a primary whose writes come mostly from the peer's clients asks the peer
 *   to promote itself (follow-the-writer.ts decides when).
 * - peer restarted: the primary's volume failed its pending requests (`PeerRestarted`); it is
 *   replaced by a new one in a new epoch, which copies the hot extents to the peer again, and
 *   the failed requests are issued again there: the client sees a pause, not an error.
 *
 * Initial sync: whenever the stream to the peer opens, the primary asks the peer for its state;
 * an Inconsistent peer gets every range of the volume (holes as punches) while I/O continues,
 * then a flush on both, then `SyncComplete`, which makes it UpToDate.
 */
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { DuplexError, errorMessage, isDuplexError } from '../core/errors.js'
import { bootId } from '../core/boot-id.js'
import { formatEpoch, nextGeneration, nextTerm } from '../core/epochs.js'
import type { Logger } from '../core/log.js'
import type { ReplaceRequest, VolumeRecord } from '../witness/arbiter.js'
import type { LeaseTiming } from '../witness/lease.js'
import { DirtyMap, mergeRanges } from './dirty-map.js'
import type { AllocationExtent, BlockDevice, ExportInfo, ZeroOptions } from '../nbd/exports.js'
import {
  adoptWitnessRecord,
  Failover,
  failoverTimingDefaults,
  judgeWitnessRecord,
  learnedRecord,
  peerLeaseDefaults,
  resyncPlan,
} from './failover.js'
import type { WitnessVerdict } from './failover.js'
import { FollowTheWriter } from './follow-the-writer.js'
import type { FollowTheWriterOptions } from './follow-the-writer.js'
import type { HelloDecision, PeerLinkClient, PeerReplies } from './peer-link.js'
import type { Hello } from './peer-messages.js'
import type {
  DescribeReply,
  ForwardReply,
  ForwardRequest,
  HandoverReply,
  HandoverRequest,
  MoveCutoverReply,
  MoveCutoverRequest,
  PeerControlClient,
  PromoteReply,
  ChecksumReply,
  ChecksumRequest,
  RenewLeaseReply,
  RenewLeaseRequest,
  RepairReply,
  RepairRequest,
  ResolveRequest,
  SyncCompleteRequest,
} from './peer-control.js'
import { absentReplica } from './peer-control.js'
import { PeerRestarted, PrimaryVolume, SecondaryVolume } from './replicated-volume.js'
import { activityLogExtentBytesDefault } from './replication.js'
import { describeFork, findFork, recordWithHistory } from './history.js'
import { decideRole } from './roles.js'
import type { NodeStore, ReplicaRecord } from './store.js'
import type { Volume } from './volume.js'
import type { WitnessSession } from './witness-session.js'
import { loadXxh64 } from './xxh64.js'

/** How long a client request waits for a role change (or a start) before it fails. */
export const roleWaitMsDefault = 30_000
/** Between two attempts to learn the peer's state at start. */
const bootstrapRetryMs = 500
/** Between two forwards refused because the peer is not primary (yet). */
const forwardRetryMs = 100
/** How often the primary looks at the follow-the-writer policy. */
const followTheWriterTickMs = 1000
const failoverTickMs = failoverTimingDefaults.tickMs
/** A degraded primary's probe of its peer gives up after this. */
const peerProbeTimeoutMs = 1000
/** How often a dirty bitmap that changed is persisted. */
const dirtyPersistIntervalMs = 1000

/** ARCHITECTURE.md: the secondary's peer lease, ~2 s, renewed by every exchange. */
export { peerLeaseDefaults }

/** DRBD's on-no-quorum: fail I/O or hold it while this replica may not serve. */
export type OnLostQuorum = 'error' | 'suspend'

export type RoleName = 'starting' | 'primary' | 'secondary' | 'closed'

/** The peer's replica as the primary sees it: `syncing` while the initial sync runs. */
export type PeerSyncState = 'unknown' | 'Inconsistent' | 'syncing' | 'UpToDate'

export interface ReplicaControllerOptions {
  nodeName: string
  peerName: string
  /** The peer's replication endpoint, HOST:PORT. */
  peerAddress: string
  /** The primary the cluster configuration names; it starts a brand-new volume. */
  configuredPrimary: string
  /** false: stay put; otherwise move the primary role to the node that writes (the policy's settings). */
  followTheWriter: false | FollowTheWriterOptions
  volume: Volume
  store: NodeStore
  link: PeerLinkClient
  control: PeerControlClient
  incarnation: Buffer
  log: Logger
  roleWaitMs?: number
  /** The node's session with the witness; without one, nothing fails over. */
  witness?: WitnessSession
  onLostQuorum?: OnLostQuorum
  peerLease?: LeaseTiming
  /** Bytes per second a sync or resync may copy (0 or undefined: unlimited). */
  resyncRateBytes?: number
  /** An op's round trip to the peer, in seconds (metrics). */
  onPeerRoundTrip?: (seconds: number) => void
}

/** A snapshot for status, metrics and tests. */
export interface ReplicaStatus {
  volume: string
  role: RoleName
  epoch: number
  primary: string
  state: ReplicaRecord['state']
  /** Primary only: the peer's replica. */
  peer: PeerSyncState
  peerConnected: boolean
  syncBytesDone: number
  syncBytesTotal: number
  /** Why the replica is not serving, if it is not. */
  waiting: string | undefined
  forwardedWrites: number
  /** Replication messages this replica refused, by reason (ops, flushes and Hellos). */
  rejected: Record<string, number>
  /** Primary only: payloads the peer refused for their checksum and that were sent again. */
  checksumRetries: number
  /** Primary only: running alone by a witness grant. */
  degraded: boolean
  /** Bytes the peer lacks (the dirty bitmap). */
  dirtyBytes: number
  /** Bytes copied to the peer by syncs and resyncs since this node started. */
  resyncBytes: number
  /** Primary only: write payload bytes on their way to both replicas. */
  inflightBytes: number
  /** Why I/O cannot be served (on-lost-quorum applies), if it cannot. */
  quorumLost: string | undefined
  /** The histories fork: why, and what to do. */
  splitBrain: string | undefined
  /** Primary only: running alone by an admin's forced promotion. */
  forced: boolean
  /** Milliseconds left on this node's witness lease (undefined: no witness). */
  witnessLeaseMs: number | undefined
  /** The witness answered recently (undefined: no witness). */
  witnessReachable: boolean | undefined
}

type Role =
  | { type: 'starting' }
  /** degraded: alone by a witness grant; forced: alone by an admin's `promote --force`. */
  | { type: 'primary'; device: PrimaryVolume; degraded: boolean; forced: boolean }
  | { type: 'secondary'; secondary: SecondaryVolume; expectedPrimary: string }
  | { type: 'closed' }

type Access = 'read' | 'write'

type Mutation =
  | { kind: 'write'; offset: number; data: Buffer; fua: boolean }
  | { kind: 'trim'; offset: number; length: number; fua: boolean }
  | { kind: 'zero'; offset: number; length: number; options: ZeroOptions }
  | { kind: 'flush' }

/** Resolves waiters whenever something they wait on may have changed. */
class Signal {
  private waiters: (() => void)[] = []
  notify(): void {
    for (const wake of this.waiters.splice(0)) wake()
  }
  /** Resolves at the next notify, or after `ms`. */
  wait(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms)
      this.waiters.push(() => {
        clearTimeout(timer)
        resolve()
      })
    })
  }
}

/** The node holding the other replica, and the clients that reach it. */
export interface PeerEndpoint {
  name: string
  /** HOST:PORT of its replication endpoint. */
  address: string
  link: PeerLinkClient
  control: PeerControlClient
}

/** How long a primary waits for the source of a move to copy what is left and hand over. */
const moveFinishDeadlineMs = 120_000
/** Between attempts to hear the witness's answer about a moved replica. */
const moveWitnessRetryMs = 250

export class ReplicaController implements BlockDevice {
  readonly info: ExportInfo
  /** Changes only when a replica move completes (`moveCutover`). */
  private peer: PeerEndpoint
  private role: Role = { type: 'starting' }
  private record: ReplicaRecord
  /** New client requests wait while set (a role change is under way). */
  private gated: string | undefined
  private waiting: string | undefined = 'starting'
  private readonly changed = new Signal()
  private inflight = 0
  private readonly idle = new Signal()
  private peerState: PeerSyncState = 'unknown'
  /** The device whose peer check (and sync) runs now. */
  private checkingPeer: PrimaryVolume | undefined
  private lastPeerCheckAt = -Infinity
  /** After a peer restart: copy the hot extents once the stream is back. */
  private hotSyncPending = false
  private syncBytesDone = 0
  private syncBytesTotal = 0
  /** Bytes copied to the peer by every sync and resync so far. */
  private resyncBytes = 0
  /** The peer's boot id when it was last known UpToDate (its page cache held our writes). */
  private peerBootIdInSync: string | undefined
  private forwardedWrites = 0
  private readonly rejected: Record<string, number> = {}
  private readonly policy: FollowTheWriter
  private policyTimer: NodeJS.Timeout | undefined
  private learning: Promise<void> | undefined
  private readonly roleWaitMs: number
  // ---- failover (only with a witness)
  private readonly dirty: DirtyMap
  private readonly failover: Failover
  private failoverTimer: NodeJS.Timeout | undefined
  private dirtyTimer: NodeJS.Timeout | undefined
  private failingOver: Promise<void> | undefined
  private quorumLost: string | undefined
  /**
   * Secondary: the epoch in which the primary last said this replica is in sync (SyncComplete).
   * Reads are served locally only in that epoch: a new primary term may still be copying its
   * activity log here (after both crashed), and this replica must not show older data meanwhile.
   */
  private syncedEpoch: number | undefined
  /** Set while the two replicas' histories fork: no automatic resync. */
  private splitBrain: string | undefined
  /** The witness must still hear that the peer is (or is not) in sync. */
  private witnessReport: boolean | undefined
  private reporting = false
  /** This replica is moving to another node and about to leave the pair: no local reads. */
  private leaving = false

  constructor(
    private readonly options: ReplicaControllerOptions,
    record: ReplicaRecord,
  ) {
    this.info = options.volume.info
    this.record = record
    this.peer = {
      name: options.peerName,
      address: options.peerAddress,
      link: options.link,
      control: options.control,
    }
    this.roleWaitMs = options.roleWaitMs ?? roleWaitMsDefault
    this.policy = new FollowTheWriter(
      performance.now(),
      options.followTheWriter === false ? {} : options.followTheWriter,
    )
    this.dirty = new DirtyMap(this.info.sizeBytes)
    this.failover = new Failover({
      ...failoverTimingDefaults,
      peerLease: options.peerLease ?? peerLeaseDefaults,
    })
  }

  get name(): string {
    return this.info.name
  }

  status(): ReplicaStatus {
    return {
      volume: this.name,
      role: this.role.type,
      epoch: this.record.epoch,
      primary: this.record.primary,
      state: this.record.state,
      peer: this.role.type === 'primary' ? this.peerState : 'unknown',
      peerConnected: this.role.type === 'primary' && this.role.device.connected,
      syncBytesDone: this.syncBytesDone,
      syncBytesTotal: this.syncBytesTotal,
      waiting: this.waiting,
      forwardedWrites: this.forwardedWrites,
      rejected: { ...this.rejected },
      checksumRetries: this.role.type === 'primary' ? this.role.device.counters.checksumRetries : 0,
      degraded: this.role.type === 'primary' && this.role.degraded,
      dirtyBytes: this.dirty.dirtyBytes,
      resyncBytes: this.resyncBytes,
      inflightBytes: this.role.type === 'primary' ? this.role.device.inflightBytes : 0,
      quorumLost: this.quorumLost,
      splitBrain: this.splitBrain,
      forced: this.role.type === 'primary' && this.role.forced,
      witnessLeaseMs: this.options.witness?.leaseRemainingMs(),
      witnessReachable: this.options.witness?.reachable,
    }
  }

  /** Decides the role (retrying until the peer answers if it must) and takes it. */
  start(): void {
    void this.loadDirty().then(() => this.bootstrap())
    // Without a witness, the tick only probes a forced primary's peer (to resync it).
    this.failoverTimer = setInterval(() => {
      this.tick()
    }, failoverTickMs)
    this.failoverTimer.unref()
    this.dirtyTimer = setInterval(() => {
      void this.persistDirty(false)
    }, dirtyPersistIntervalMs)
    this.dirtyTimer.unref()
    if (this.options.followTheWriter !== false) {
      this.policyTimer = setInterval(() => {
        this.considerMove()
      }, followTheWriterTickMs)
      this.policyTimer.unref()
    }
  }

  async close(): Promise<void> {
    clearInterval(this.policyTimer)
    clearInterval(this.failoverTimer)
    clearInterval(this.dirtyTimer)
    const role = this.role
    this.role = { type: 'closed' }
    this.changed.notify()
    if (role.type === 'primary') {
      role.device.close()
      await role.device.idle()
    } else if (role.type === 'secondary') {
      role.secondary.close('node shutting down')
    }
    await this.persistDirty(true)
  }

  // ---- BlockDevice (this node's NBD clients)

  read(offset: number, length: number): Promise<Buffer> {
    return this.retrying('local', () =>
      this.run('read', (role) =>
        role.type === 'secondary' && !this.readsLocally()
          ? this.forward({ kind: 'read', offset, length }).then((reply) => reply.data)
          : this.options.volume.read(offset, length),
      ),
    )
  }

  cache(offset: number, length: number): Promise<void> {
    return this.options.volume.cache(offset, length)
  }

  allocation(offset: number, length: number, extentsMax: number): Promise<AllocationExtent[]> {
    if (this.record.state !== 'UpToDate') {
      // Being filled: this replica's map says nothing about the volume. "Data" is always true.
      return Promise.resolve([{ lengthBytes: length, hole: false, zero: false }])
    }
    return this.options.volume.allocation(offset, length, extentsMax)
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.mutate({ kind: 'write', offset, data, fua }, 'local')
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.mutate({ kind: 'trim', offset, length, fua }, 'local')
  }

  zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    return this.mutate({ kind: 'zero', offset, length, options }, 'local')
  }

  flush(): Promise<void> {
    return this.mutate({ kind: 'flush' }, 'local')
  }

  // ---- Peer control (the peer node's requests for this volume)

  async describe(): Promise<DescribeReply> {
    const hotExtents = (await this.options.store.activityLog(this.name)?.hotExtents()) ?? []
    return {
      exists: true,
      epoch: this.record.epoch,
      primary: this.record.primary,
      state: this.record.state,
      sizeBytes: this.info.sizeBytes,
      hotExtents,
      extentBytes: hotExtents.length > 0 ? activityLogExtentBytesDefault : 0,
      dirty: (this.role.type === 'primary' && this.role.degraded) || !this.dirty.isEmpty,
      bootId,
      history: this.record.history ?? [],
      ...(this.role.type === 'primary' && this.peerState === 'syncing'
        ? {
            syncBytesDone: Math.min(this.syncBytesDone, this.syncBytesTotal),
            syncBytesTotal: this.syncBytesTotal,
          }
        : { syncBytesDone: 0, syncBytesTotal: 0 }),
      moveBytesDone: 0,
      moveBytesTotal: 0,
    }
  }

  /** xxh64 of each chunk of a range of this replica (`duplex volume verify`). */
  async checksum(request: ChecksumRequest): Promise<ChecksumReply> {
    const { offset, length, chunkBytes } = request
    if (offset + length > this.info.sizeBytes) {
      throw new DuplexError(
        'OUT_OF_RANGE',
        `${length} bytes at ${offset} are beyond the end of ${this.name} (${this.info.sizeBytes} bytes)`,
      )
    }
    const xxh64 = await loadXxh64()
    const sums: bigint[] = []
    for (let at = offset; at < offset + length; at += chunkBytes) {
      const bytes = Math.min(chunkBytes, offset + length - at)
      sums.push(xxh64(await this.options.volume.read(at, bytes)))
    }
    return { sums }
  }

  /** Primary: copy these ranges to the peer again, ordered against client writes. */
  async repair(request: RepairRequest): Promise<RepairReply> {
    const role = await this.settled('write')
    if (role.type !== 'primary' || role.degraded || !role.device.connected) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `${this.name} can be repaired only by its primary while both replicas are connected`,
      )
    }
    for (const range of request.ranges) {
      if (range.offset + range.length > this.info.sizeBytes) {
        throw new DuplexError(
          'OUT_OF_RANGE',
          `range ${range.offset}+${range.length} is beyond the end of ${this.name}`,
        )
      }
    }
    const ranges = mergeRanges(request.ranges)
    let bytes = 0
    await role.device.sync(ranges, (range) => {
      bytes += range.length
    })
    await role.device.flush()
    this.options.log.warn('repaired ranges found different by verify', {
      volume: this.name,
      ranges: ranges.length,
      bytes,
    })
    return { bytes }
  }

  /** The peer renews its lease on this replica (see lease.ts; ARCHITECTURE.md "Leases"). */
  renewLease(request: RenewLeaseRequest): RenewLeaseReply {
    const role = this.role
    const counterpart =
      request.fromNode === this.peer.name &&
      request.epoch === this.record.epoch &&
      ((role.type === 'primary' && !role.degraded) ||
        (role.type === 'secondary' && role.expectedPrimary === request.fromNode))
    const granted = this.failover.grantRenewal(counterpart, performance.now())
    return { granted, epoch: this.record.epoch }
  }

  /** A request of a client attached to the peer's node: served here if this node is primary. */
  async serveForwarded(request: ForwardRequest): Promise<ForwardReply> {
    if (request.fromNode !== this.peer.name) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `${request.fromNode} holds no replica of ${this.name}; only ${this.peer.name} may forward`,
      )
    }
    const role = await this.settled(request.kind === 'read' ? 'read' : 'write')
    if (role.type !== 'primary') {
      throw new DuplexError(
        'NOT_PRIMARY',
        `${this.options.nodeName} is not the primary of ${this.name} (role ${role.type})`,
      )
    }
    const empty = Buffer.alloc(0)
    switch (request.kind) {
      case 'read':
        return { data: await this.options.volume.read(request.offset, request.length) }
      case 'write':
        await this.mutate(
          { kind: 'write', offset: request.offset, data: request.data, fua: request.fua },
          'forwarded',
        )
        return { data: empty }
      case 'trim':
        await this.mutate(
          { kind: 'trim', offset: request.offset, length: request.length, fua: request.fua },
          'forwarded',
        )
        return { data: empty }
      case 'zero':
        await this.mutate(
          {
            kind: 'zero',
            offset: request.offset,
            length: request.length,
            options: { fua: request.fua, noHole: request.noHole, fastZero: request.fastZero },
          },
          'forwarded',
        )
        return { data: empty }
      case 'flush':
        await this.mutate({ kind: 'flush' }, 'forwarded')
        return { data: empty }
    }
  }

  /** The current primary's side of a handover to the peer. */
  async handover(request: HandoverRequest): Promise<HandoverReply> {
    const { toNode } = request
    if (toNode !== this.peer.name || request.fromNode !== toNode) {
      throw new DuplexError('INVALID_ARGUMENT', `${toNode} cannot take over ${this.name}`)
    }
    const role = this.role
    if (role.type === 'secondary' && this.record.primary === toNode) {
      return { epoch: this.record.epoch } // done already (a retried call)
    }
    if (role.type === 'primary') {
      if (request.epoch !== this.record.epoch) {
        throw new DuplexError(
          'FAILED_PRECONDITION',
          `handover of ${this.name} asked for epoch ${request.epoch}, the volume is in ${this.record.epoch}`,
        )
      }
      if (this.peerState !== 'UpToDate') {
        throw new DuplexError(
          'FAILED_PRECONDITION',
          `${toNode}'s replica of ${this.name} is ${this.peerState}, not UpToDate: wait for the sync`,
        )
      }
      return this.handOver(role.device, toNode)
    }
    // A replica that never joined a pair (epoch 0) holds nothing the pair wrote (roles.ts).
    const empty = this.record.state !== 'UpToDate' || (this.record.epoch === 0 && request.epoch > 0)
    if (empty && this.record.primary !== toNode) {
      // This replica holds nothing the peer lacks (rebuilt empty): let the peer lead.
      const record: ReplicaRecord = {
        epoch: Math.max(this.record.epoch, request.epoch) + 1,
        primary: toNode,
        state: 'Inconsistent',
      }
      await this.persist(record)
      if (role.type === 'secondary') {
        role.secondary.advance(record.epoch, toNode)
        this.role = { ...role, expectedPrimary: toNode }
      }
      return { epoch: record.epoch }
    }
    throw new DuplexError(
      'FAILED_PRECONDITION',
      `${this.options.nodeName} is not the primary of ${this.name} (${this.record.primary} is)`,
    )
  }

  // ---- moving a replica (move.ts): the primary's side, and the source's

  /** The peer this replica pairs with now. */
  get peerName(): string {
    return this.peer.name
  }

  /** This replica's record (the source of a move hands it to the target). */
  get replicaRecord(): ReplicaRecord {
    return this.record
  }

  /**
   * Source of a move: while set, reads of this node's clients go to the primary, so that none
   * returns data older than what the primary acknowledged with the new replica. Set before the
   * final copy; cleared if the move did not complete.
   */
  setLeaving(leaving: boolean): void {
    this.leaving = leaving
  }

  /**
   * Source of a move, asked by the primary with client I/O paused: whether this replica is the
   * primary's in-sync secondary in `epoch`, so that its bytes are the volume's.
   */
  checkMoveSource(fromNode: string, epoch: number): void {
    const role = this.role
    if (
      role.type !== 'secondary' ||
      role.expectedPrimary !== fromNode ||
      this.record.primary !== fromNode ||
      this.record.state !== 'UpToDate' ||
      this.record.epoch !== epoch
    ) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `the replica of ${this.name} on ${this.options.nodeName} is not ${fromNode}'s in-sync ` +
          `secondary in epoch ${formatEpoch(epoch)} (${role.type}, ${this.record.state}, ` +
          `primary ${this.record.primary} in ${formatEpoch(this.record.epoch)})`,
      )
    }
  }

  /**
   * Primary: the peer's replica is moving to `target` and its copy has nearly caught up. Client
   * I/O pauses; in-flight requests drain and both replicas flush; the source copies what is left
   * and hands its record to the target (`moveFinish`); the witness records the new pair (same
   * epoch, in sync) together with the catalog; then this primary replicates to the target in the
   * next term and I/O resumes. The target holds exactly the source's bytes, so nothing needs a
   * resync. Until the witness grants, a failure leaves the pair as it was. The witness's answer
   * is awaited however long it takes: resuming with the wrong peer could lose writes.
   */
  async moveCutover(request: MoveCutoverRequest, target: PeerEndpoint): Promise<MoveCutoverReply> {
    const me = this.options.nodeName
    const { fromNode, toNode } = request
    const witness = this.options.witness
    if (this.peer.name === toNode) return { epoch: this.record.epoch } // done (a retried call)
    if (witness === undefined) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `moving a replica of ${this.name} needs the witness`,
      )
    }
    if (fromNode !== this.peer.name || target.name !== toNode || toNode === me) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `${this.name} on ${me} pairs with ${this.peer.name}; it cannot move ${fromNode}'s replica to ${toNode}`,
      )
    }
    const role = await this.settled('write')
    if (
      role.type !== 'primary' ||
      role.degraded ||
      role.forced ||
      !role.device.connected ||
      this.peerState !== 'UpToDate'
    ) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `${this.name} on ${me} is not a primary in sync with ${fromNode}; a replica moves only ` +
          `from a synced pair (role ${role.type}, peer ${this.peerState})`,
      )
    }
    this.gate(`moving ${fromNode}'s replica to ${toNode}`)
    const started = performance.now()
    try {
      await this.drained()
      await role.device.flush()
      if (this.role !== role) {
        throw new DuplexError('UNAVAILABLE', `${this.name} changed role; the move retries`)
      }
      const epoch = this.record.epoch
      const adopted = await this.peer.control.moveFinish(
        { volume: this.name, fromNode: me, toNode, epoch },
        moveFinishDeadlineMs,
      )
      await this.recordReplacement(witness, {
        volume: this.name,
        node: me,
        epoch,
        fromNode,
        toNode,
      })
      role.device.close()
      await role.device.idle()
      this.peer = target
      this.peerState = 'unknown'
      this.peerBootIdInSync = adopted.bootId
      this.hotSyncPending = false
      await this.persist({ epoch: nextTerm(epoch), primary: me, state: 'UpToDate' })
      await this.becomePrimary(false)
      this.options.log.info('replica moved: replicating to the new node', {
        volume: this.name,
        from: fromNode,
        to: toNode,
        pausedMs: Math.round(performance.now() - started),
      })
      return { epoch: this.record.epoch }
    } finally {
      this.ungate()
    }
  }

  /** Asks the witness until it answers: granted (returns) or refused for good (throws). */
  private async recordReplacement(witness: WitnessSession, request: ReplaceRequest): Promise<void> {
    for (;;) {
      try {
        await witness.replaceReplica(request)
        return
      } catch (error) {
        const code = isDuplexError(error) ? error.code : 'IO_ERROR'
        if (code !== 'UNAVAILABLE' && code !== 'IO_ERROR' && code !== 'SHUTTING_DOWN') throw error
        if (this.role.type === 'closed') throw error
        this.options.log.warn(
          'the witness has not answered about the moved replica; asking again',
          {
            volume: this.name,
            error: errorMessage(error),
          },
        )
        await sleep(moveWitnessRetryMs)
      }
    }
  }

  /** Make this node the primary (admin `volume promote`, follow the writer, a rebuilt peer). */
  async promote(force = false): Promise<PromoteReply> {
    if (force) return this.forcePromote()
    const role = await this.settled('write')
    if (role.type === 'primary') return { epoch: this.record.epoch, primary: this.options.nodeName }
    if (role.type !== 'secondary') {
      throw new DuplexError('UNAVAILABLE', `${this.name} is ${role.type} on this node`)
    }
    if (this.record.state !== 'UpToDate') {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `the replica of ${this.name} on ${this.options.nodeName} is ${this.record.state}; ` +
          'it can become primary once the initial sync completed',
      )
    }
    this.gate('promoting')
    try {
      const reply = await this.peer.control.handover({
        volume: this.name,
        epoch: this.record.epoch,
        toNode: this.options.nodeName,
        fromNode: this.options.nodeName,
      })
      const record: ReplicaRecord = {
        epoch: reply.epoch,
        primary: this.options.nodeName,
        state: 'UpToDate',
      }
      await this.persist(record)
      role.secondary.close('this node became primary')
      await this.becomePrimary(false)
      this.options.log.info('promoted', { volume: this.name, epoch: record.epoch })
      return { epoch: record.epoch, primary: this.options.nodeName }
    } finally {
      this.ungate()
    }
  }

  /**
   * `promote --force`: the admin says the peer's site and the witness are gone. This replica
   * becomes primary alone in a new generation recorded as forced, without any grant. If the peer
   * is in fact running alone too, the two histories fork: that is the split brain the admin
   * accepted, detected when they meet again (`resolve` picks the survivor).
   */
  private async forcePromote(): Promise<PromoteReply> {
    const role = this.role
    const me = this.options.nodeName
    if (role.type === 'primary' && role.degraded) return { epoch: this.record.epoch, primary: me }
    if (role.type === 'primary' && role.device.connected) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `${this.name} on ${me} is primary and connected to its peer: nothing to force`,
      )
    }
    if (role.type === 'secondary' && this.failover.peerLeaseValid(performance.now())) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `${this.peer.name} is reachable and primary of ${this.name}: promote without --force`,
      )
    }
    if (role.type !== 'primary' && role.type !== 'secondary') {
      throw new DuplexError('UNAVAILABLE', `${this.name} is ${role.type} on this node`)
    }
    this.gate('forced promotion')
    try {
      // The peer may still hold a lease from this replica (it reads locally under it): let it
      // run out before writing alone.
      const leaseLeft = this.failover.detach() - performance.now()
      if (leaseLeft > 0) await new Promise((resolve) => setTimeout(resolve, leaseLeft))
      if (role.type === 'primary') {
        for (const range of role.device.handOff('forced promotion')) {
          this.dirty.mark(range.offset, range.length)
        }
        await role.device.idle()
      } else {
        role.secondary.close('forced promotion')
      }
      const stale = this.record.state
      // Above every generation this node heard of (the witness may have issued newer ones).
      const epoch = nextGeneration(
        Math.max(this.record.epoch, this.options.witness?.record(this.name)?.epoch ?? 0),
      )
      await this.persist({ epoch, primary: me, state: 'UpToDate' }, true)
      this.options.log.error('FORCED promotion by an admin: running alone without the witness', {
        volume: this.name,
        epoch: formatEpoch(epoch),
        stateBefore: stale,
      })
      await this.becomePrimary(true, true)
      this.regainQuorum()
      return { epoch, primary: me }
    } finally {
      this.ungate()
    }
  }

  /**
   * After a split brain, on the node whose replica is discarded: forget what it wrote alone and
   * follow `keep`, which fills it with a full sync.
   */
  async resolve(request: ResolveRequest): Promise<void> {
    const me = this.options.nodeName
    if (request.keep === me) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `resolve goes to the node whose replica is discarded, not to ${me} which is kept`,
      )
    }
    if (request.keep !== this.peer.name) {
      throw new DuplexError('INVALID_ARGUMENT', `${request.keep} holds no replica of ${this.name}`)
    }
    const peer = await this.peer.control.describe(this.name, 5000)
    if (!peer.exists || peer.state !== 'UpToDate' || peer.primary !== request.keep) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `${request.keep}'s replica of ${this.name} cannot be kept: it is ` +
          `${peer.exists ? peer.state : 'missing'} and follows ${peer.primary || 'nobody'}; keep ` +
          `${this.options.nodeName} instead, or promote ${request.keep} with --force first`,
      )
    }
    const record = this.options.witness?.record(this.name)
    if (
      record !== undefined &&
      record.owner === this.options.nodeName &&
      record.epoch > peer.epoch
    ) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `the witness follows ${this.options.nodeName} in epoch ${formatEpoch(record.epoch)}, newer ` +
          `than ${request.keep}'s ${formatEpoch(peer.epoch)}: keep ${this.options.nodeName}`,
      )
    }
    const role = this.role
    this.gate('resolving a split brain')
    try {
      if (role.type === 'primary') {
        role.device.handOff(`discarded in favour of ${request.keep}`)
        await role.device.idle()
      } else if (role.type === 'secondary') {
        role.secondary.close('resolving a split brain')
      }
      this.dirty.clearAll()
      await this.persistDirty(true)
      await this.options.store.activityLog(this.name)?.clear()
      // The discarded replica adopts the survivor's record as it is, even where its own epoch
      // was higher (a forced generation): the survivor's next epoch must be accepted here.
      const adopted: ReplicaRecord = {
        epoch: peer.epoch,
        primary: request.keep,
        state: 'Inconsistent',
        history: peer.history,
      }
      await this.options.store.setReplica(this.name, adopted)
      this.record = adopted
      this.splitBrain = undefined
      this.options.log.error(
        'split brain resolved: this replica is discarded and will be refilled',
        {
          volume: this.name,
          keep: request.keep,
        },
      )
      this.becomeSecondary(request.keep)
    } finally {
      this.ungate()
    }
  }

  /** The primary says the initial sync is complete: this replica is UpToDate. */
  async syncComplete(request: SyncCompleteRequest): Promise<void> {
    const role = this.role
    if (
      role.type !== 'secondary' ||
      request.epoch !== this.record.epoch ||
      request.fromNode !== role.expectedPrimary
    ) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `sync of ${this.name} from ${request.fromNode} in epoch ${request.epoch} does not match ` +
          `this replica (epoch ${this.record.epoch}, primary ${this.record.primary})`,
      )
    }
    // This replica now equals the primary's: its own activity log (from when it was primary)
    // names no difference any more.
    await this.options.store.activityLog(this.name)?.clear()
    await this.persist({ ...this.record, state: 'UpToDate' })
    this.syncedEpoch = request.epoch
    // The primary just reached this replica: give the leases time to be renewed before any
    // failover decision is made on the new state.
    this.roleStarted()
    this.options.log.info('replica is UpToDate', { volume: this.name, epoch: request.epoch })
  }

  /** Decides on a replication stream from the peer (PeerLinkServer's onStream). */
  onStream(hello: Hello, replies: PeerReplies): HelloDecision {
    const role = this.role
    const reject = (
      code: 'NOT_SECONDARY' | 'WRONG_SENDER' | 'EPOCH_STALE' | 'EPOCH_AHEAD',
      message: string,
    ): HelloDecision => {
      if (code !== 'EPOCH_AHEAD') {
        this.countReject(code)
        this.options.log.warn('refused a replication stream', {
          volume: this.name,
          from: hello.fromNode,
          epoch: hello.epoch,
          code,
          why: message,
        })
      }
      return { type: 'reject', code, message, epoch: this.record.epoch }
    }
    if (role.type !== 'secondary') {
      return reject('NOT_SECONDARY', `${this.name} is ${role.type} on ${this.options.nodeName}`)
    }
    if (hello.fromNode !== role.expectedPrimary) {
      return reject(
        'WRONG_SENDER',
        `${hello.fromNode} is not the primary of ${this.name} (${role.expectedPrimary} is)`,
      )
    }
    if (hello.epoch < this.record.epoch) {
      return reject('EPOCH_STALE', `epoch ${hello.epoch} is older than ${this.record.epoch}`)
    }
    if (hello.epoch > this.record.epoch) {
      // The primary started (again) in a new epoch: record it, then accept its next attempt.
      this.learnEpoch(hello.epoch, hello.fromNode)
      return reject('EPOCH_AHEAD', `learning epoch ${hello.epoch}; retry`)
    }
    return role.secondary.accept(hello, replies)
  }

  // ---- internals

  private async bootstrap(): Promise<void> {
    const { nodeName, log } = this.options
    const peerName = this.peer.name
    if (this.options.witness !== undefined) await this.options.witness.ready(2000)
    for (;;) {
      if (this.role.type === 'closed') return
      // Each round: a witness that was unreachable at start may answer later, and its record
      // (e.g. a takeover this node was granted but never persisted) can be what lets it lead.
      await this.adoptWitnessRecord()
      let remote: DescribeReply | undefined
      try {
        remote = await this.peer.control.describe(this.name, 2000)
      } catch (error) {
        if (!isDuplexError(error, 'UNAVAILABLE') && !isDuplexError(error, 'VOLUME_NOT_FOUND')) {
          log.warn('peer cannot describe its replica', {
            volume: this.name,
            error: errorMessage(error),
          })
        }
        remote = isDuplexError(error, 'VOLUME_NOT_FOUND') ? { ...absentReplica } : undefined
      }
      const fork =
        remote?.exists === true ? findFork(this.record.history ?? [], remote.history) : undefined
      if (fork !== undefined) {
        const why = describeFork(fork)
        if (this.splitBrain !== why) log.error('split brain', { volume: this.name, why })
        this.splitBrain = why
        this.waiting = why
        await this.changed.wait(10 * bootstrapRetryMs)
        continue
      }
      if (remote?.exists === true && remote.sizeBytes !== this.info.sizeBytes) {
        this.waiting = `${peerName}'s replica is ${remote.sizeBytes} bytes, this one ${this.info.sizeBytes}`
        log.error('replica sizes differ; not serving', { volume: this.name, why: this.waiting })
        await this.changed.wait(10 * bootstrapRetryMs)
        continue
      }
      const decision = decideRole({
        me: nodeName,
        peer: peerName,
        configuredPrimary: this.options.configuredPrimary,
        local: this.record,
        remote,
      })
      try {
        switch (decision.type) {
          case 'primary':
            await this.persist(decision.record)
            // After a crash or a stop the activity log names where the replicas may differ.
            this.hotSyncPending = true
            await this.becomePrimary(false)
            return
          case 'secondary':
            if (!sameRecord(decision.record, this.record)) await this.persist(decision.record)
            this.becomeSecondary(decision.expectedPrimary)
            return
          case 'askPeerToTakeOver':
            log.warn('asking the peer to take over', { volume: this.name, why: decision.reason })
            this.waiting = decision.reason
            await this.peer.control.promote({ volume: this.name })
            break // describe again: the peer now leads
          case 'wait':
            if (this.waiting !== decision.reason) {
              log.warn('replica waiting', { volume: this.name, why: decision.reason })
            }
            this.waiting = decision.reason
            break
        }
      } catch (error) {
        log.warn('replica start failed; retrying', {
          volume: this.name,
          error: errorMessage(error),
        })
      }
      await this.changed.wait(bootstrapRetryMs)
    }
  }

  /**
   * With a witness, what it recorded while this node was away wins over the local record: a
   * takeover by the peer makes this replica its secondary, Outdated unless the volume stayed in
   * sync in this replica's generation.
   */
  private async adoptWitnessRecord(): Promise<void> {
    const record = this.options.witness?.record(this.name)
    const adopted = adoptWitnessRecord(this.record, record, this.options.nodeName)
    if (record === undefined || adopted === undefined) return
    this.options.log.info('adopting the witness record', {
      volume: this.name,
      epoch: formatEpoch(record.epoch),
      owner: record.owner,
      state: adopted.state,
    })
    await this.persist(adopted)
  }

  private async becomePrimary(degraded: boolean, forced = false): Promise<void> {
    if (this.role.type === 'closed') return
    const { volume, store, log } = this.options
    const activityLog = store.activityLog(this.name)
    if (activityLog === undefined) {
      throw new DuplexError('VOLUME_NOT_FOUND', `volume ${this.name} is gone from the store`)
    }
    this.peerState = 'unknown'
    const device = await PrimaryVolume.start({
      local: volume,
      activityLog,
      epoch: this.record.epoch,
      nodeName: this.options.nodeName,
      peerAddress: this.peer.address,
      client: this.peer.link,
      incarnation: this.options.incarnation,
      log: log.child(this.name),
      ...(degraded || forced ? { degraded: { dirty: this.dirty } } : {}),
      coolingAllowed: () => this.dirty.isEmpty,
      onPeerConnected: () => {
        void this.checkPeer(device)
      },
      onPeerRestarted: () => {
        void this.switchPrimary(device, false, 'the peer restarted')
      },
      ...(this.options.onPeerRoundTrip === undefined
        ? {}
        : { onPeerRoundTrip: this.options.onPeerRoundTrip }),
    })
    this.role = { type: 'primary', device, degraded: degraded || forced, forced }
    this.roleStarted()
    this.waiting = undefined
    this.policy.reset(performance.now())
    this.changed.notify()
    log.info(degraded ? 'serving as primary, alone (degraded)' : 'serving as primary', {
      volume: this.name,
      epoch: formatEpoch(this.record.epoch),
    })
    if (this.options.witness !== undefined && !degraded) {
      // Register (or confirm) with the witness; it learns "in sync" once the peer is checked.
      this.witnessReport ??= false
      void this.reportToWitness()
    }
  }

  private becomeSecondary(expectedPrimary: string): void {
    const secondary = new SecondaryVolume({
      local: this.options.volume,
      epoch: this.record.epoch,
      primary: expectedPrimary,
      log: this.options.log.child(this.name),
      onReject: (code) => {
        this.countReject(code)
      },
    })
    this.role = { type: 'secondary', secondary, expectedPrimary }
    this.roleStarted()
    this.waiting = undefined
    this.changed.notify()
    this.options.log.info('serving as secondary', {
      volume: this.name,
      epoch: this.record.epoch,
      primary: expectedPrimary,
      state: this.record.state,
    })
  }

  /**
   * Primary: the stream is (re)open; bring the peer up to date if it needs it. An Inconsistent
   * peer gets every range (initial sync). Otherwise a resync copies where the replicas may
   * differ: the dirty bitmap (what this node wrote alone), this node's activity log (writes in
   * flight at a crash or a peer restart) and the peer's own activity log (from when it was
   * primary). Then a flush on both and SyncComplete; the witness then records the volume in sync.
   */
  private async checkPeer(device: PrimaryVolume): Promise<void> {
    // One check (and sync) at a time; one that failed is retried by the tick.
    if (this.checkingPeer === device) return
    this.checkingPeer = device
    this.lastPeerCheckAt = performance.now()
    try {
      await this.checkPeerOnce(device)
    } finally {
      if (this.checkingPeer === device) this.checkingPeer = undefined
    }
  }

  private async checkPeerOnce(device: PrimaryVolume): Promise<void> {
    let peer: DescribeReply
    try {
      peer = await this.peer.control.describe(this.name)
    } catch (error) {
      this.options.log.warn('cannot learn the peer state', { error: errorMessage(error) })
      return
    }
    if (this.role.type !== 'primary' || this.role.device !== device) return
    // Never resync across a fork: which side to keep is the admin's call (resolve).
    if (this.forked(peer.history)) return
    const plan = resyncPlan({
      sizeBytes: this.info.sizeBytes,
      peer: {
        state: peer.state,
        bootId: peer.bootId,
        hot: peer.hotExtents.map((extent) => ({
          offset: extent * peer.extentBytes,
          length: Math.min(peer.extentBytes, this.info.sizeBytes - extent * peer.extentBytes),
        })),
      },
      hotSyncPending: this.hotSyncPending,
      peerBootIdInSync: this.peerBootIdInSync,
      dirty: this.dirty.ranges(),
      ownHot: device.hotRanges(),
    })
    if (plan.type === 'inSync') {
      // Nothing to copy; the peer still hears it, as it serves no reads before (readsLocally).
      try {
        await this.peer.control.syncComplete({
          volume: this.name,
          epoch: this.record.epoch,
          fromNode: this.options.nodeName,
        })
      } catch (error) {
        this.options.log.warn('cannot tell the peer it is in sync', { error: errorMessage(error) })
        return
      }
      this.peerInSync(peer.bootId)
      return
    }
    const { kind, ranges } = plan
    const full = kind === 'full'
    this.hotSyncPending = false
    this.peerState = 'syncing'
    this.syncBytesDone = 0
    this.syncBytesTotal = ranges.reduce((sum, range) => sum + range.length, 0)
    if (this.options.witness !== undefined) {
      this.witnessReport = false
      void this.reportToWitness()
    }
    const started = performance.now()
    this.options.log.info('sync to the peer started', {
      volume: this.name,
      kind,
      bytes: this.syncBytesTotal,
    })
    try {
      await device.sync(
        ranges,
        (range) => {
          this.syncBytesDone += range.length
          this.resyncBytes += range.length
          this.dirty.clear(range.offset, range.length)
        },
        this.options.resyncRateBytes ?? 0,
      )
      await device.flush()
      await this.peer.control.syncComplete({
        volume: this.name,
        epoch: this.record.epoch,
        fromNode: this.options.nodeName,
      })
      this.dirty.clearAll()
      await this.persistDirty(true)
      this.options.log.info('sync to the peer complete', {
        volume: this.name,
        kind,
        bytes: this.syncBytesTotal,
        seconds: ((performance.now() - started) / 1000).toFixed(1),
      })
      this.peerInSync(peer.bootId)
    } catch (error) {
      this.peerState = full ? 'Inconsistent' : 'unknown'
      if (!full) this.hotSyncPending = true
      this.options.log.warn('sync to the peer interrupted; it restarts when the stream is back', {
        volume: this.name,
        error: errorMessage(error),
      })
    }
  }

  private peerInSync(peerBootId: string): void {
    this.peerState = 'UpToDate'
    this.peerBootIdInSync = peerBootId
    if (this.options.witness !== undefined) {
      this.witnessReport = true
      void this.reportToWitness()
    }
  }

  /** Tells the witness what this primary runs (retried by the failover tick until it hears). */
  private async reportToWitness(): Promise<void> {
    const witness = this.options.witness
    const inSync = this.witnessReport
    if (witness === undefined || inSync === undefined || this.role.type !== 'primary') return
    if (this.reporting) return // the tick retries; one report in flight at a time
    this.reporting = true
    const me = this.options.nodeName
    try {
      await witness.report({
        volume: this.name,
        node: me,
        replicas: [me, this.peer.name],
        epoch: this.record.epoch,
        primary: me,
        inSync,
      })
      if (this.witnessReport === inSync) this.witnessReport = undefined
    } catch (error) {
      this.options.log.debug('cannot report to the witness; retrying', {
        error: errorMessage(error),
      })
    } finally {
      this.reporting = false
    }
  }

  /**
   * Continue as primary in a new epoch with a new volume: after the peer restarted, when the
   * witness granted running alone (`degraded`), or to resync a returning peer. Requests pending
   * in the old volume fail with PeerRestarted and are issued again in the new one.
   */
  private async switchPrimary(
    old: PrimaryVolume,
    degraded: boolean,
    why: string,
    epoch = nextTerm(this.record.epoch),
    /** The new generation was not issued by the witness (a forced lineage continues). */
    forced = false,
  ): Promise<void> {
    this.gate(why)
    try {
      // The peer may lack what was pending (issued here, never acknowledged by both).
      for (const range of old.handOff(why)) this.dirty.mark(range.offset, range.length)
      await old.idle()
      if (this.role.type !== 'primary' || this.role.device !== old) return
      await this.persist({ epoch, primary: this.options.nodeName, state: 'UpToDate' }, forced)
      await this.becomePrimary(degraded)
    } catch (error) {
      this.options.log.error('cannot continue as primary', {
        volume: this.name,
        why,
        error: errorMessage(error),
      })
    } finally {
      this.ungate()
    }
  }

  /** Drain, flush both replicas, record the peer as primary of the next epoch, follow it. */
  private async handOver(device: PrimaryVolume, toNode: string): Promise<HandoverReply> {
    this.gate(`handing over to ${toNode}`)
    try {
      await this.drained()
      await device.flush()
      // With a witness, it must record the new owner (it arbitrates by owner): a new generation.
      const epoch =
        this.options.witness === undefined
          ? this.record.epoch + 1
          : (
              await this.options.witness.recordHandover({
                volume: this.name,
                fromNode: this.options.nodeName,
                toNode,
                epoch: this.record.epoch,
              })
            ).epoch
      const record: ReplicaRecord = { epoch, primary: toNode, state: 'UpToDate' }
      await this.persist(record)
      device.close()
      await device.idle()
      this.becomeSecondary(toNode)
      this.options.log.info('handed over', { volume: this.name, to: toNode, epoch: record.epoch })
      return { epoch: record.epoch }
    } finally {
      this.ungate()
    }
  }

  // ---- failover (with a witness; ARCHITECTURE.md "Leases" and "Failures")

  private roleStarted(): void {
    this.failover.roleStarted(performance.now())
    // A report of the old role must not reach the witness as one of the new role's ("in sync"
    // from a paired primary, replayed after it took over alone).
    this.witnessReport = undefined
  }

  /** Whether this replica may serve `access` now (reads need a lease; alone, so do writes). */
  private mayServe(role: Role, access: Access): boolean {
    const witness = this.options.witness
    if (role.type !== 'primary') return true
    if (role.forced) return true
    if (witness === undefined) return true
    if (this.quorumLost !== undefined) return false
    if (role.degraded) return witness.leaseValid()
    return access === 'write' || this.failover.peerLeaseValid(performance.now())
  }

  /** Secondary: reads are served here only from an UpToDate replica whose primary is in touch. */
  private readsLocally(): boolean {
    if (this.leaving) return false
    if (this.record.state !== 'UpToDate' || this.syncedEpoch !== this.record.epoch) return false
    return this.options.witness === undefined || this.failover.peerLeaseValid(performance.now())
  }

  private lostQuorumError(): DuplexError {
    return new DuplexError(
      'UNAVAILABLE',
      `volume ${this.name} cannot be served on ${this.options.nodeName}: ${this.quorumLost ?? 'no quorum'}`,
    )
  }

  /** I/O fails (or holds) from now on, until service is possible again. */
  private loseQuorum(why: string): void {
    if (this.quorumLost === why) return
    const first = this.quorumLost === undefined
    this.quorumLost = why
    this.options.log.warn('no quorum: I/O follows on-lost-quorum', {
      volume: this.name,
      policy: this.options.onLostQuorum ?? 'error',
      why,
    })
    this.changed.notify()
    const role = this.role
    if (
      first &&
      role.type === 'primary' &&
      !role.degraded &&
      this.options.onLostQuorum !== 'suspend'
    ) {
      // Requests waiting for the lost peer's ack fail now (they are issued again, and refused).
      void this.switchPrimary(role.device, false, 'quorum lost')
    }
  }

  /** A failover attempt failed: lose quorum now if that is final, or once patience runs out. */
  private failoverFailed(error: unknown, why: string): void {
    const final = !isDuplexError(error, 'UNAVAILABLE')
    if (this.failover.refused(performance.now(), final)) this.loseQuorum(why)
  }

  private regainQuorum(): void {
    this.failover.regained()
    if (this.quorumLost === undefined) return
    this.quorumLost = undefined
    this.options.log.info('quorum regained', { volume: this.name })
    this.changed.notify()
  }

  /** Every failoverTickMs: renew the peer lease, and fail over when the peer is gone (failover.ts). */
  private tick(): void {
    const now = performance.now()
    const role = this.role
    const step = this.failover.tick({
      now,
      role:
        role.type === 'primary'
          ? {
              type: 'primary',
              degraded: role.degraded,
              forced: role.forced,
              connected: role.device.connected,
            }
          : role.type === 'secondary'
            ? { type: 'secondary', expectedPrimary: role.expectedPrimary, state: this.record.state }
            : { type: 'none' },
      witness: this.options.witness !== undefined,
      witnessLeaseValid: this.options.witness?.leaseValid(now) === true,
      busy: this.failingOver !== undefined || this.gated !== undefined,
      witnessVerdict: this.witnessVerdict().type,
    })
    if (step.renew) this.renewPeerLease(now)
    if (
      role.type === 'primary' &&
      !role.degraded &&
      role.device.connected &&
      this.checkingPeer !== role.device &&
      this.peerState !== 'UpToDate' &&
      now - this.lastPeerCheckAt >= failoverTimingDefaults.retryMs
    ) {
      // A check or sync that failed while the stream stayed up (or came back meanwhile).
      void this.checkPeer(role.device)
    }
    if (role.type === 'primary' && this.witnessReport !== undefined) void this.reportToWitness()
    if (step.quorum?.type === 'regain') this.regainQuorum()
    if (step.quorum?.type === 'lose') this.loseQuorum(step.quorum.why)
    if (role.type === 'primary' && role.forced) this.reportForced()
    const start = (work: () => Promise<void>): void => {
      this.failingOver = work().finally(() => {
        this.failingOver = undefined
      })
    }
    if (role.type === 'primary' && step.action === 'reattach') {
      start(() => this.reattach(role.device))
    } else if (role.type === 'primary' && step.action === 'degrade') {
      start(() => this.degrade(role.device))
    } else if (role.type === 'secondary' && step.action === 'takeover') {
      start(() => this.takeOver(role))
    } else if (step.action === 'yield' || step.action === 'adopt') {
      const record = this.options.witness?.record(this.name)
      const verdict = this.witnessVerdict()
      if (record !== undefined && verdict.type === 'yield') start(() => this.yieldTo(record))
      if (role.type === 'primary' && verdict.type === 'adopt') {
        this.options.log.warn('continuing in the generation the witness holds for this node', {
          volume: this.name,
          witnessEpoch: formatEpoch(record?.epoch ?? 0),
          epoch: formatEpoch(verdict.epoch),
        })
        start(() =>
          this.switchPrimary(
            role.device,
            role.degraded,
            'witness record',
            verdict.epoch,
            verdict.forced,
          ),
        )
      }
    }
  }

  private witnessVerdict(): WitnessVerdict {
    const record = this.options.witness?.record(this.name)
    return judgeWitnessRecord(this.record, record, this.options.nodeName)
  }

  /** A forced primary tells the witness about its generation (the witness adopts a newer one). */
  private reportForced(): void {
    const witness = this.options.witness
    if (this.witnessReport !== undefined || witness?.reachable !== true) return
    const record = witness.record(this.name)
    if (record === undefined || record.epoch < this.record.epoch) {
      this.witnessReport = false
      void this.reportToWitness()
    }
  }

  private renewPeerLease(now: number): void {
    const epoch = this.record.epoch
    this.peer.control
      .renewLease(
        { volume: this.name, fromNode: this.options.nodeName, epoch },
        this.failover.timing.peerLease.leaseMs / 2,
      )
      .then(
        (reply) => {
          this.failover.renewAnswered(now, reply.granted && epoch === this.record.epoch)
        },
        () => {
          this.failover.renewAnswered(now, false)
        },
      )
  }

  /** The peer is gone: ask the witness to run alone in a new generation. */
  private async degrade(device: PrimaryVolume): Promise<void> {
    const witness = this.options.witness
    if (witness === undefined) return
    const me = this.options.nodeName
    let grant: VolumeRecord
    try {
      grant = await witness.degrade({ volume: this.name, node: me, epoch: this.record.epoch })
    } catch (error) {
      if (this.role.type !== 'primary' || this.role.device !== device) return
      const record = witness.record(this.name)
      if (
        isDuplexError(error, 'FAILED_PRECONDITION') &&
        record !== undefined &&
        record.owner !== me &&
        // An older record (the witness has not heard of a forced lineage yet) is not followed.
        record.epoch > this.record.epoch
      ) {
        await this.yieldTo(record)
        return
      }
      this.failoverFailed(
        error,
        `${this.peer.name} is unreachable and the witness did not let this node run alone (${errorMessage(error)})`,
      )
      return
    }
    if (this.role.type !== 'primary' || this.role.device !== device) return
    this.options.log.warn('peer lost: running alone (degraded) by the witness grant', {
      volume: this.name,
      peer: this.peer.name,
      epoch: formatEpoch(grant.epoch),
    })
    const epoch = Math.max(grant.epoch, nextTerm(this.record.epoch))
    await this.switchPrimary(device, true, 'the witness granted running alone', epoch)
  }

  /** The witness names another owner: this replica follows it, Outdated (it may lack writes). */
  private async yieldTo(record: VolumeRecord): Promise<void> {
    const role = this.role
    this.gate(`${record.owner} owns ${this.name}`)
    try {
      if (role.type === 'primary') {
        role.device.handOff(`${record.owner} owns the volume`)
        await role.device.idle()
      } else if (role.type === 'secondary') {
        role.secondary.close(`${record.owner} owns the volume`)
      }
      const state = this.record.state === 'UpToDate' ? 'Outdated' : this.record.state
      await this.persist({ epoch: record.epoch, primary: record.owner, state })
      this.options.log.warn('another replica owns the volume; following it', {
        volume: this.name,
        owner: record.owner,
        epoch: formatEpoch(record.epoch),
        state,
      })
      this.becomeSecondary(record.owner)
    } finally {
      this.ungate()
    }
  }

  /** The primary is gone: ask the witness to take over, alone, in a new generation. */
  private async takeOver(role: Extract<Role, { type: 'secondary' }>): Promise<void> {
    const witness = this.options.witness
    if (witness === undefined) return
    const me = this.options.nodeName
    const before = this.record
    let grant: VolumeRecord
    try {
      grant = await witness.takeover({ volume: this.name, node: me, epoch: this.record.epoch })
    } catch (error) {
      // Decided on a state that changed meanwhile (e.g. a resync finished): decide again.
      if (this.role !== role || this.record !== before) return
      const record = witness.record(this.name)
      if (record !== undefined && record.owner !== me && !record.inSync) {
        if (this.record.state === 'UpToDate') {
          await this.persist({ ...this.record, state: 'Outdated' })
        }
        this.loseQuorum(
          `${record.owner} runs ${this.name} alone and is unreachable from here; this replica is Outdated`,
        )
        return
      }
      this.failoverFailed(
        error,
        `the primary ${role.expectedPrimary} is unreachable and the witness did not grant a takeover (${errorMessage(error)})`,
      )
      return
    }
    // A grant is the witness's serialized decision: act on it while this replica is still the
    // secondary that asked (the old owner, if alive, finds its stream refused and yields).
    if (this.role !== role) return
    if (grant.epoch <= this.record.epoch) {
      this.failoverFailed(
        new DuplexError('FAILED_PRECONDITION', `stale grant ${formatEpoch(grant.epoch)}`),
        `the witness granted a takeover in epoch ${formatEpoch(grant.epoch)}, not newer than ${formatEpoch(this.record.epoch)}`,
      )
      return
    }
    this.gate('taking over')
    try {
      role.secondary.close('this node took over')
      await this.persist({ epoch: grant.epoch, primary: me, state: 'UpToDate' })
      this.options.log.warn('primary lost: took over, running alone (degraded)', {
        volume: this.name,
        from: role.expectedPrimary,
        epoch: formatEpoch(grant.epoch),
      })
      await this.becomePrimary(true)
    } finally {
      this.ungate()
    }
  }

  /** Degraded: when the peer answers again, replicate to it again and resync it. */
  private async reattach(device: PrimaryVolume): Promise<void> {
    let peer: DescribeReply
    try {
      peer = await this.peer.control.describe(this.name, peerProbeTimeoutMs)
    } catch {
      return
    }
    if (!peer.exists || peer.sizeBytes !== this.info.sizeBytes) return
    if (this.forked(peer.history)) return
    this.splitBrain = undefined
    if (peer.primary === this.peer.name && peer.epoch > this.record.epoch) {
      this.options.log.error('the peer runs the volume in a newer epoch: split brain?', {
        volume: this.name,
        peerEpoch: formatEpoch(peer.epoch),
        epoch: formatEpoch(this.record.epoch),
      })
      return
    }
    if (this.role.type !== 'primary' || this.role.device !== device) return
    this.options.log.info('peer is back: replicating again, then resyncing it', {
      volume: this.name,
      peer: this.peer.name,
      dirtyBytes: this.dirty.dirtyBytes,
      resyncBytes: this.resyncBytes,
    })
    // A forced primary continues in a generation above every one issued meanwhile, so that the
    // witness adopts this lineage (after a split brain it may hold the discarded side's).
    const role = this.role
    const epoch = role.forced
      ? nextGeneration(
          Math.max(
            this.record.epoch,
            peer.epoch,
            this.options.witness?.record(this.name)?.epoch ?? 0,
          ),
        )
      : nextTerm(this.record.epoch)
    await this.switchPrimary(device, false, 'the peer is back', epoch, role.forced)
  }

  /** Whether the two histories fork (split brain): then reported, in the log and the metric. */
  private forked(peerHistory: ReplicaRecord['history']): boolean {
    const fork = findFork(this.record.history ?? [], peerHistory ?? [])
    if (fork === undefined) return false
    const why = describeFork(fork)
    if (this.splitBrain !== why) this.options.log.error('split brain', { volume: this.name, why })
    this.splitBrain = why
    return true
  }

  private async loadDirty(): Promise<void> {
    try {
      const bits = await this.options.store.dirtyBits(this.name)
      if (bits === undefined) return
      if (bits.length !== DirtyMap.bitsLength(this.info.sizeBytes)) {
        throw new DuplexError('STORE_CORRUPT', `dirty bitmap of ${bits.length} bytes`)
      }
      const loaded = new DirtyMap(this.info.sizeBytes, undefined, bits)
      for (const range of loaded.ranges()) this.dirty.mark(range.offset, range.length)
      this.options.log.info('dirty regions from before the restart', {
        volume: this.name,
        bytes: this.dirty.dirtyBytes,
      })
    } catch (error) {
      // Without it, the activity log still covers the writes made alone since the last flush;
      // mark everything to be safe.
      this.options.log.error('cannot load the dirty bitmap; the whole volume will be resynced', {
        volume: this.name,
        error: errorMessage(error),
      })
      this.dirty.mark(0, this.info.sizeBytes)
    }
  }

  private async persistDirty(sync: boolean): Promise<void> {
    if (!this.dirty.hasChanges) return
    try {
      await this.options.store.setDirtyBits(this.name, this.dirty.takeChanges(), sync)
    } catch (error) {
      this.options.log.warn('cannot persist the dirty bitmap', { error: errorMessage(error) })
    }
  }

  private learnEpoch(epoch: number, primary: string): void {
    this.learning ??= (async () => {
      try {
        if (epoch <= this.record.epoch) return
        const learned = learnedRecord(this.record, epoch, primary)
        await this.persist(learned)
        const role = this.role
        if (role.type === 'secondary') role.secondary.advance(epoch, primary)
        this.options.log.info('learned a new epoch', {
          volume: this.name,
          epoch: formatEpoch(epoch),
          primary,
          state: learned.state,
        })
      } catch (error) {
        this.options.log.error('cannot record a new epoch', { error: errorMessage(error) })
      } finally {
        this.learning = undefined
      }
    })()
  }

  private considerMove(): void {
    const role = this.role
    if (role.type !== 'primary' || this.gated !== undefined || this.peerState !== 'UpToDate') return
    if (!this.policy.shouldMove(performance.now())) return
    const window = this.policy.window(performance.now())
    this.options.log.info('follow the writer: moving the primary role to the peer', {
      volume: this.name,
      to: this.peer.name,
      forwardedBytes: window.forwardedBytes,
      localBytes: window.localBytes,
    })
    this.peer.control.promote({ volume: this.name }).then(
      () => {
        this.policy.reset(performance.now())
      },
      (error: unknown) => {
        this.policy.reset(performance.now())
        this.options.log.warn('follow the writer: the move failed', { error: errorMessage(error) })
      },
    )
  }

  private countReject(code: string): void {
    this.rejected[code] = (this.rejected[code] ?? 0) + 1
  }

  /**
   * Records `record` durably, then acts on it. Entering a new generation appends it to the
   * generation history (`forced`: by an admin's forced promotion).
   */
  private async persist(record: ReplicaRecord, forced = false): Promise<void> {
    const next = recordWithHistory(this.record, record, forced)
    await this.options.store.setReplica(this.name, next)
    this.record = next
  }

  private gate(why: string): void {
    this.gated = why
  }

  private ungate(): void {
    this.gated = undefined
    this.changed.notify()
  }

  /**
   * Waits until the role is settled (started, no change under way) and may serve `access`, up to
   * roleWaitMs; once quorum is lost, `onLostQuorum` decides: fail at once, or wait for service.
   */
  private async settled(access: Access): Promise<Role> {
    const suspend = this.options.onLostQuorum === 'suspend'
    const deadline = performance.now() + this.roleWaitMs
    for (;;) {
      const role = this.role
      if (role.type === 'closed') {
        throw new DuplexError('SHUTTING_DOWN', `volume ${this.name} is closing on this node`)
      }
      if (role.type !== 'starting' && this.gated === undefined) {
        if (this.mayServe(role, access)) return role
        if (this.quorumLost !== undefined && !suspend) throw this.lostQuorumError()
      }
      const left =
        suspend && this.quorumLost !== undefined ? roleWaitMsDefault : deadline - performance.now()
      if (left <= 0) {
        const why = this.gated ?? this.quorumLost ?? this.waiting ?? 'starting'
        throw new DuplexError('UNAVAILABLE', `volume ${this.name} is not available: ${why}`)
      }
      await this.changed.wait(Math.min(left, failoverTickMs))
    }
  }

  /** Runs a client request with the role settled, counted so that a handover can drain. */
  private run<T>(access: Access, fn: (role: Role) => Promise<T>): Promise<T> {
    const role = this.role
    // The common case, on every request: settled already, no waiting (and no extra await).
    if (
      role.type !== 'starting' &&
      role.type !== 'closed' &&
      this.gated === undefined &&
      this.mayServe(role, access)
    ) {
      return this.runIn(role, fn)
    }
    return this.settled(access).then((settled) => this.runIn(settled, fn))
  }

  private runIn<T>(role: Role, fn: (role: Role) => Promise<T>): Promise<T> {
    this.inflight += 1
    const done = (): void => {
      this.inflight -= 1
      if (this.inflight === 0) this.idle.notify()
    }
    let result: Promise<T>
    try {
      result = fn(role)
    } catch (error) {
      done()
      return Promise.reject(error instanceof Error ? error : new Error(String(error)))
    }
    result.then(done, done)
    return result
  }

  private async drained(): Promise<void> {
    while (this.inflight > 0) await this.idle.wait(1000)
  }

  private mutate(mutation: Mutation, source: 'local' | 'forwarded'): Promise<void> {
    return this.retrying(source, () =>
      this.run('write', (role) => this.mutateAs(role, mutation, source)),
    )
  }

  /**
   * Runs `attempt`, and again once the role settles when a role change is under way: the peer is
   * not primary yet (or any more), the peer restarted or a failover moved this node to a new
   * epoch (the request was never acknowledged, so issuing it again there is safe: the old
   * epoch's local writes finish before the new epoch starts), or the primary is unreachable
   * while a failover may still bring service back.
   */
  private retrying<T>(source: 'local' | 'forwarded', attempt: () => Promise<T>): Promise<T> {
    // The common path: one attempt, no extra async frame.
    return attempt().catch((error: unknown) => this.retryAfter(source, attempt, error))
  }

  private async retryAfter<T>(
    source: 'local' | 'forwarded',
    attempt: () => Promise<T>,
    first: unknown,
  ): Promise<T> {
    const deadline = performance.now() + this.roleWaitMs
    let error = first
    for (;;) {
      const unreachable =
        this.options.witness !== undefined &&
        isDuplexError(error, 'UNAVAILABLE') &&
        !(error instanceof PeerRestarted)
      if (unreachable && this.quorumLost !== undefined && this.options.onLostQuorum !== 'suspend') {
        throw this.lostQuorumError()
      }
      const suspended = this.quorumLost !== undefined && this.options.onLostQuorum === 'suspend'
      const retryable =
        error instanceof PeerRestarted ||
        (source === 'local' && (isDuplexError(error, 'NOT_PRIMARY') || unreachable))
      if (!retryable || (!suspended && performance.now() + forwardRetryMs >= deadline)) {
        throw error
      }
      await this.changed.wait(forwardRetryMs)
      try {
        return await attempt()
      } catch (failure) {
        error = failure
      }
    }
  }

  private mutateAs(role: Role, mutation: Mutation, source: 'local' | 'forwarded'): Promise<void> {
    if (role.type === 'primary') {
      if (mutation.kind === 'write') {
        if (this.options.followTheWriter !== false) {
          this.policy.record(performance.now(), source, mutation.data.length)
        }
        if (source === 'forwarded') this.forwardedWrites += 1
      }
      return applyTo(role.device, mutation)
    }
    if (source === 'forwarded') {
      return Promise.reject(
        new DuplexError(
          'NOT_PRIMARY',
          `${this.options.nodeName} is not the primary of ${this.name}`,
        ),
      )
    }
    return this.forward(toForward(mutation)).then(() => undefined)
  }

  private forward(
    request: Pick<ForwardRequest, 'kind' | 'offset' | 'length'> & Partial<ForwardRequest>,
  ): Promise<ForwardReply> {
    return this.peer.control.forward({
      volume: this.name,
      fromNode: this.options.nodeName,
      data: Buffer.alloc(0),
      fua: false,
      noHole: false,
      fastZero: false,
      ...request,
    })
  }
}

function applyTo(device: PrimaryVolume, mutation: Mutation): Promise<void> {
  switch (mutation.kind) {
    case 'write':
      return device.write(mutation.offset, mutation.data, mutation.fua)
    case 'trim':
      return device.trim(mutation.offset, mutation.length, mutation.fua)
    case 'zero':
      return device.zero(mutation.offset, mutation.length, mutation.options)
    case 'flush':
      return device.flush()
  }
}

function toForward(
  mutation: Mutation,
): Pick<ForwardRequest, 'kind' | 'offset' | 'length'> & Partial<ForwardRequest> {
  switch (mutation.kind) {
    case 'write':
      return {
        kind: 'write',
        offset: mutation.offset,
        length: mutation.data.length,
        data: mutation.data,
        fua: mutation.fua,
      }
    case 'trim':
      return { kind: 'trim', offset: mutation.offset, length: mutation.length, fua: mutation.fua }
    case 'zero':
      return {
        kind: 'zero',
        offset: mutation.offset,
        length: mutation.length,
        fua: mutation.options.fua,
        noHole: mutation.options.noHole,
        fastZero: mutation.options.fastZero,
      }
    case 'flush':
      return { kind: 'flush', offset: 0, length: 0 }
  }
}

function sameRecord(a: ReplicaRecord, b: ReplicaRecord): boolean {
  return a.epoch === b.epoch && a.primary === b.primary && a.state === b.state
}
