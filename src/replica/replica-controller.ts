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
import { DuplexError, errorMessage, isDuplexError } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { AllocationExtent, BlockDevice, ExportInfo, ZeroOptions } from '../nbd/exports.js'
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
  PeerControlClient,
  PromoteReply,
  SyncCompleteRequest,
} from './peer-control.js'
import { PeerRestarted, PrimaryVolume, SecondaryVolume } from './replicated-volume.js'
import type { ByteRange } from './replicated-volume.js'
import { decideRole } from './roles.js'
import type { NodeStore, ReplicaRecord } from './store.js'
import type { Volume } from './volume.js'

/** How long a client request waits for a role change (or a start) before it fails. */
export const roleWaitMsDefault = 30_000
/** Between two attempts to learn the peer's state at start. */
const bootstrapRetryMs = 500
/** Between two forwards refused because the peer is not primary (yet). */
const forwardRetryMs = 100
/** How often the primary looks at the follow-the-writer policy. */
const followTheWriterTickMs = 1000

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
}

type Role =
  | { type: 'starting' }
  | { type: 'primary'; device: PrimaryVolume }
  | { type: 'secondary'; secondary: SecondaryVolume; expectedPrimary: string }
  | { type: 'closed' }

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

export class ReplicaController implements BlockDevice {
  readonly info: ExportInfo
  private role: Role = { type: 'starting' }
  private record: ReplicaRecord
  /** New client requests wait while set (a role change is under way). */
  private gated: string | undefined
  private waiting: string | undefined = 'starting'
  private readonly changed = new Signal()
  private inflight = 0
  private readonly idle = new Signal()
  private peerState: PeerSyncState = 'unknown'
  /** After a peer restart: copy the hot extents once the stream is back. */
  private hotSyncPending = false
  private syncBytesDone = 0
  private syncBytesTotal = 0
  private forwardedWrites = 0
  private readonly rejected: Record<string, number> = {}
  private readonly policy: FollowTheWriter
  private policyTimer: NodeJS.Timeout | undefined
  private learning: Promise<void> | undefined
  private readonly roleWaitMs: number

  constructor(
    private readonly options: ReplicaControllerOptions,
    record: ReplicaRecord,
  ) {
    this.info = options.volume.info
    this.record = record
    this.roleWaitMs = options.roleWaitMs ?? roleWaitMsDefault
    this.policy = new FollowTheWriter(
      performance.now(),
      options.followTheWriter === false ? {} : options.followTheWriter,
    )
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
    }
  }

  /** Decides the role (retrying until the peer answers if it must) and takes it. */
  start(): void {
    void this.bootstrap()
    if (this.options.followTheWriter !== false) {
      this.policyTimer = setInterval(() => {
        this.considerMove()
      }, followTheWriterTickMs)
      this.policyTimer.unref()
    }
  }

  async close(): Promise<void> {
    clearInterval(this.policyTimer)
    const role = this.role
    this.role = { type: 'closed' }
    this.changed.notify()
    if (role.type === 'primary') {
      role.device.close()
      await role.device.idle()
    } else if (role.type === 'secondary') {
      role.secondary.close('node shutting down')
    }
  }

  // ---- BlockDevice (this node's NBD clients)

  read(offset: number, length: number): Promise<Buffer> {
    return this.run((role) =>
      role.type === 'secondary' && this.record.state !== 'UpToDate'
        ? this.forward({ kind: 'read', offset, length }).then((reply) => reply.data)
        : this.options.volume.read(offset, length),
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

  describe(): DescribeReply {
    return {
      exists: true,
      epoch: this.record.epoch,
      primary: this.record.primary,
      state: this.record.state,
      sizeBytes: this.info.sizeBytes,
    }
  }

  /** A request of a client attached to the peer's node: served here if this node is primary. */
  async serveForwarded(request: ForwardRequest): Promise<ForwardReply> {
    if (request.fromNode !== this.options.peerName) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `${request.fromNode} holds no replica of ${this.name}; only ${this.options.peerName} may forward`,
      )
    }
    const role = await this.settled()
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
    if (toNode !== this.options.peerName || request.fromNode !== toNode) {
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

  /** Make this node the primary (admin `volume promote`, follow the writer, a rebuilt peer). */
  async promote(): Promise<PromoteReply> {
    const role = await this.settled()
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
      const reply = await this.options.control.handover({
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
      await this.becomePrimary()
      this.options.log.info('promoted', { volume: this.name, epoch: record.epoch })
      return { epoch: record.epoch, primary: this.options.nodeName }
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
    await this.persist({ ...this.record, state: 'UpToDate' })
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
    const { nodeName, peerName, log } = this.options
    for (;;) {
      if (this.role.type === 'closed') return
      let remote: DescribeReply | undefined
      try {
        remote = await this.options.control.describe(this.name, 2000)
      } catch (error) {
        if (!isDuplexError(error, 'UNAVAILABLE') && !isDuplexError(error, 'VOLUME_NOT_FOUND')) {
          log.warn('peer cannot describe its replica', {
            volume: this.name,
            error: errorMessage(error),
          })
        }
        remote = isDuplexError(error, 'VOLUME_NOT_FOUND')
          ? { exists: false, epoch: 0, primary: '', state: 'Inconsistent', sizeBytes: 0 }
          : undefined
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
            await this.becomePrimary()
            return
          case 'secondary':
            if (!sameRecord(decision.record, this.record)) await this.persist(decision.record)
            this.becomeSecondary(decision.expectedPrimary)
            return
          case 'askPeerToTakeOver':
            log.warn('asking the peer to take over', { volume: this.name, why: decision.reason })
            this.waiting = decision.reason
            await this.options.control.promote({ volume: this.name })
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

  private async becomePrimary(): Promise<void> {
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
      peerAddress: this.options.peerAddress,
      client: this.options.link,
      incarnation: this.options.incarnation,
      log: log.child(this.name),
      onPeerConnected: () => {
        void this.checkPeer(device)
      },
      onPeerRestarted: () => {
        void this.replacePrimary(device)
      },
    })
    this.role = { type: 'primary', device }
    this.waiting = undefined
    this.policy.reset(performance.now())
    this.changed.notify()
    log.info('serving as primary', { volume: this.name, epoch: this.record.epoch })
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
    this.waiting = undefined
    this.changed.notify()
    this.options.log.info('serving as secondary', {
      volume: this.name,
      epoch: this.record.epoch,
      primary: expectedPrimary,
      state: this.record.state,
    })
  }

  /** Primary: the stream is (re)open; fill the peer if it needs it. */
  private async checkPeer(device: PrimaryVolume): Promise<void> {
    if (this.peerState === 'syncing') return
    let peer: DescribeReply
    try {
      peer = await this.options.control.describe(this.name)
    } catch (error) {
      this.options.log.warn('cannot learn the peer state', { error: errorMessage(error) })
      return
    }
    if (this.role.type !== 'primary' || this.role.device !== device) return
    if (peer.state === 'UpToDate' && !this.hotSyncPending) {
      this.peerState = 'UpToDate'
      return
    }
    const full = peer.state !== 'UpToDate'
    const ranges: ByteRange[] = full
      ? [{ offset: 0, length: this.info.sizeBytes }]
      : device.hotRanges()
    this.hotSyncPending = false
    this.peerState = 'syncing'
    this.syncBytesDone = 0
    this.syncBytesTotal = ranges.reduce((sum, range) => sum + range.length, 0)
    const started = performance.now()
    this.options.log.info('sync to the peer started', {
      volume: this.name,
      kind: full ? 'full' : 'hot extents',
      bytes: this.syncBytesTotal,
    })
    try {
      await device.sync(ranges, (range) => {
        this.syncBytesDone += range.length
      })
      await device.flush()
      if (full) {
        await this.options.control.syncComplete({
          volume: this.name,
          epoch: this.record.epoch,
          fromNode: this.options.nodeName,
        })
      }
      this.peerState = 'UpToDate'
      this.options.log.info('sync to the peer complete', {
        volume: this.name,
        seconds: ((performance.now() - started) / 1000).toFixed(1),
      })
    } catch (error) {
      this.peerState = full ? 'Inconsistent' : 'unknown'
      if (!full) this.hotSyncPending = true
      this.options.log.warn('sync to the peer interrupted; it restarts when the stream is back', {
        volume: this.name,
        error: errorMessage(error),
      })
    }
  }

  /** The peer restarted: continue in a new epoch and copy the hot extents to it again. */
  private async replacePrimary(old: PrimaryVolume): Promise<void> {
    this.gate('peer restarted')
    try {
      old.close()
      await old.idle()
      if (this.role.type !== 'primary' || this.role.device !== old) return
      await this.persist({ ...this.record, epoch: this.record.epoch + 1 })
      this.hotSyncPending = true
      await this.becomePrimary()
    } catch (error) {
      this.options.log.error('cannot continue after the peer restarted', {
        volume: this.name,
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
      const record: ReplicaRecord = {
        epoch: this.record.epoch + 1,
        primary: toNode,
        state: 'UpToDate',
      }
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

  private learnEpoch(epoch: number, primary: string): void {
    this.learning ??= (async () => {
      try {
        if (epoch <= this.record.epoch) return
        await this.persist({ ...this.record, epoch, primary })
        const role = this.role
        if (role.type === 'secondary') role.secondary.advance(epoch, primary)
        this.options.log.info('learned a new epoch', { volume: this.name, epoch, primary })
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
      to: this.options.peerName,
      forwardedBytes: window.forwardedBytes,
      localBytes: window.localBytes,
    })
    this.options.control.promote({ volume: this.name }).then(
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

  private async persist(record: ReplicaRecord): Promise<void> {
    await this.options.store.setReplica(this.name, record)
    this.record = { ...record }
  }

  private gate(why: string): void {
    this.gated = why
  }

  private ungate(): void {
    this.gated = undefined
    this.changed.notify()
  }

  /** Waits until the role is settled (started, no change under way), up to roleWaitMs. */
  private async settled(): Promise<Role> {
    const deadline = performance.now() + this.roleWaitMs
    for (;;) {
      const role = this.role
      if (role.type === 'closed') {
        throw new DuplexError('SHUTTING_DOWN', `volume ${this.name} is closing on this node`)
      }
      if (role.type !== 'starting' && this.gated === undefined) return role
      const left = deadline - performance.now()
      if (left <= 0) {
        throw new DuplexError(
          'UNAVAILABLE',
          `volume ${this.name} is not available: ${this.gated ?? this.waiting ?? 'starting'}`,
        )
      }
      await this.changed.wait(left)
    }
  }

  /** Runs a client request with the role settled, counted so that a handover can drain. */
  private run<T>(fn: (role: Role) => Promise<T>): Promise<T> {
    const role = this.role
    // The common case, on every request: settled already, no waiting (and no extra await).
    if (role.type !== 'starting' && role.type !== 'closed' && this.gated === undefined) {
      return this.runIn(role, fn)
    }
    return this.settled().then((settled) => this.runIn(settled, fn))
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

  private async mutate(mutation: Mutation, source: 'local' | 'forwarded'): Promise<void> {
    let deadline: number | undefined // taken at the first failure: none on the common path
    for (;;) {
      try {
        await this.run((role) => this.mutateAs(role, mutation, source))
        return
      } catch (error) {
        // Try again once the role settles when a role change is under way: the peer is not
        // primary yet (or any more), or the peer restarted and this node continues in a new
        // epoch (the request was never acknowledged, so issuing it again there is safe: the
        // old epoch's local writes finish before the new epoch starts).
        deadline ??= performance.now() + this.roleWaitMs
        const retry =
          performance.now() + forwardRetryMs < deadline &&
          (error instanceof PeerRestarted ||
            (source === 'local' && isDuplexError(error, 'NOT_PRIMARY')))
        if (!retry) throw error
        await this.changed.wait(forwardRetryMs)
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
    return this.options.control.forward({
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
