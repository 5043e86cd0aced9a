/**
 * Drivers of synchronous replication: they run the pure cores of replication.ts against real I/O.
 *
 * - `PrimaryVolume` is the `BlockDevice` NBD clients use on the primary's node. Writes, trims,
 *   zeroes and flushes become core events; the core's effects become local volume I/O, sends on
 *   the peer stream and activity-log transactions; completions and acks are fed back as events.
 *   A request's promise settles only on the core's `reply`, i.e. after BOTH replicas are done.
 *   Reads, cache and block status are served by the local replica.
 * - `SecondaryVolume` is the secondary's side of the stream: it applies what the primary sends
 *   through its `SecondaryReplication` core and acks.
 *
 * - `PrimaryVolume.sync` copies ranges to a peer that lacks them (initial sync) through the core,
 *   so copies are ordered against client writes; the copy reads this replica once the core holds
 *   the range.
 * - Activity log: every 2 s, when more than `hotExtentsTarget` extents are hot, the primary flushes
 *   both replicas and cools the extents the core reports idle, so the log (and what a crash
 *   resyncs) stays near its target size.
 *
 * Events are queued and handled one at a time, so an effect whose handler calls back
 * synchronously (a stream closing while we send) never re-enters the core.
 *
 * Peer connection (primary): the driver keeps one stream open, reconnecting with backoff. After a
 * reconnect to the SAME peer incarnation it reports `peerConnected` and the core re-sends what
 * was not acknowledged. A different incarnation means the peer process restarted and may have
 * lost writes it had acknowledged but not flushed: re-sending is not enough, the hot extents
 * need a resync (issue 4). Until then the volume refuses to acknowledge writes (they fail with
 * IO_ERROR, saying why): it never pretends the replicas are in sync.
 */
import { performance } from 'node:perf_hooks'
import { assert, unreachable } from '../core/assert.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { AllocationExtent, BlockDevice, ExportInfo, ZeroOptions } from '../nbd/exports.js'
import type { ActivityLog } from './activity-log.js'
import type {
  HelloDecision,
  LinkClosed,
  PeerLinkClient,
  PeerReplies,
  PeerStream,
  ReceivedOp,
} from './peer-link.js'
import type { Hello } from './peer-messages.js'
import { PrimaryReplication, SecondaryReplication } from './replication.js'
import type {
  BlockOp,
  NodeId,
  OpKind,
  PrimaryCounters,
  PrimaryEffect,
  PrimaryEvent,
  ReplicationCode,
  RequestId,
  SecondaryCounters,
  SecondaryEffect,
  SecondaryEvent,
} from './replication.js'
import type { DirtyMap } from './dirty-map.js'
import type { Volume } from './volume.js'

/**
 * Activity-log size the primary aims for: beyond this many hot extents (4 MiB each, so 256 MiB),
 * it flushes both replicas and cools the extents that are idle. A crash then resyncs at most about
 * this much; fewer would cost more synced activity-log writes under a wide working set.
 */
export const hotExtentsTargetDefault = 64
/** How often the primary looks at the size of its activity log. */
const coolIntervalMs = 2000

/**
 * What pending requests fail with when the peer restarted and the owner (`onPeerRestarted`)
 * continues in a new epoch: nothing was acknowledged, so the owner re-issues them there.
 */
export class PeerRestarted extends DuplexError {
  constructor(message: string) {
    super('UNAVAILABLE', message)
  }
}

/** Reconnect backoff bounds for the primary's peer stream. */
const reconnectDelayMsMin = 100
const reconnectDelayMsMax = 2000

/** Runs events through a handler one at a time, in order, even when handlers enqueue more. */
class EventQueue<E> {
  private readonly queue: E[] = []
  private running = false
  constructor(private readonly handle: (event: E) => void) {}
  push(event: E): void {
    this.queue.push(event)
    if (this.running) return
    this.running = true
    try {
      for (let next = this.queue.shift(); next !== undefined; next = this.queue.shift()) {
        this.handle(next)
      }
    } finally {
      this.running = false
    }
  }
}

function replicationFailure(code: ReplicationCode, volume: string): DuplexError {
  return new DuplexError('IO_ERROR', `replication of volume ${volume} failed: ${code}`)
}

interface PendingRequest {
  resolve: () => void
  reject: (error: Error) => void
  kind: OpKind | 'flush'
  data: Buffer | undefined
  zero: ZeroOptions | undefined
  /** Set for the copies of `sync`: what is sent is read from this replica once the range is ours. */
  sync: SyncCopy | undefined
  /** The range a write, trim, zero or copy changes (empty for a flush). */
  range: ByteRange
}

/**
 * A range copied to the peer by `sync`. It goes through the core like a client write, so it is
 * ordered against client writes; its "local write" is a read of this replica, taken when the core
 * issues it (the range is then held: no overlapping write runs until both sides are done), and
 * the send waits for that read.
 */
interface SyncCopy {
  /** What the read found: data to write, or nothing but zeroes (sent as a hole punch). */
  wire: { kind: 'write' | 'zero'; data: Buffer } | undefined
  /** The core's sendToPeer, held until the read is done. */
  deferred: Extract<PrimaryEffect, { type: 'sendToPeer' }> | undefined
}

/** A byte range of a volume. */
export interface ByteRange {
  offset: number
  length: number
}

/** Copies larger than this are split (a data copy is held in memory while in flight). */
const syncDataChunkBytes = 1024 * 1024
/** Runs of holes are sent as hole punches of at most this length. */
const syncHoleChunkBytes = 32 * 1024 * 1024
/** Copies in flight at once. */
const syncParallel = 32

export interface PrimaryVolumeOptions {
  local: Volume
  activityLog: ActivityLog
  epoch: number
  nodeName: NodeId
  /** The secondary's replication endpoint, HOST:PORT. */
  peerAddress: string
  client: PeerLinkClient
  incarnation: Buffer
  log: Logger
  /** The stream to the peer is open (again): a good time to ask whether it needs a sync. */
  onPeerConnected?: () => void
  /** Hot extents to keep at most (see hotExtentsTargetDefault). */
  hotExtentsTarget?: number
  /**
   * False: keep every hot extent (the owner still has dirty regions whose bitmap may not be
   * durable; the activity log is their crash record).
   */
  coolingAllowed?: () => boolean
  /**
   * Degraded: the witness granted this node sole ownership of `epoch`. No peer stream; writes
   * complete locally and their ranges are marked in `dirty` (which the owner persists).
   */
  degraded?: { dirty: DirtyMap }
  /**
   * The peer process restarted: its replication memory is gone, so this volume acknowledges
   * nothing more (every pending request failed). The owner replaces it with a new one in a
   * new epoch once `idle()` resolves.
   */
  onPeerRestarted?: () => void
  /** An op's round trip to the peer: sent on the stream until its ack (metrics). */
  onPeerRoundTrip?: (seconds: number) => void
}

export class PrimaryVolume implements BlockDevice {
  readonly info: ExportInfo
  private readonly core: PrimaryReplication
  private readonly events: EventQueue<PrimaryEvent>
  private readonly requests = new Map<RequestId, PendingRequest>()
  private readonly admitWaiters: (() => void)[] = []
  private nextRequestId = 1
  private stream: PeerStream | undefined
  private peerIncarnation: Buffer | undefined
  /** Set once nothing more can be acknowledged here; every request then fails with it. */
  private failure: DuplexError | undefined
  private closing = false
  private reconnectDelayMs = reconnectDelayMsMin
  private reconnectTimer: NodeJS.Timeout | undefined
  /** Local writes, reads for sync and flushes still running on this replica. */
  private localInflight = 0
  private localIdleWaiters: (() => void)[] = []
  private coolTimer: NodeJS.Timeout | undefined
  private cooling = false
  /** When each unacknowledged op went on the stream, by seq (for `onPeerRoundTrip`). */
  private readonly sentAt = new Map<number, number>()

  private constructor(
    private readonly options: PrimaryVolumeOptions,
    hotExtents: number[],
  ) {
    this.info = options.local.info
    this.core = new PrimaryReplication({
      epoch: options.epoch,
      hotExtents,
      degraded: options.degraded !== undefined,
    })
    this.events = new EventQueue((event) => {
      this.perform(this.core.step(event))
    })
  }

  /** Loads the persisted activity log and starts connecting to the secondary. */
  static async start(options: PrimaryVolumeOptions): Promise<PrimaryVolume> {
    const volume = new PrimaryVolume(options, await options.activityLog.hotExtents())
    if (options.degraded === undefined) volume.connect()
    volume.coolTimer = setInterval(() => {
      void volume.cool()
    }, coolIntervalMs)
    volume.coolTimer.unref()
    return volume
  }

  get connected(): boolean {
    return this.core.isConnected
  }

  /** Write payload bytes on their way to both replicas (metrics). */
  get inflightBytes(): number {
    return this.core.inflightPayloadBytes
  }

  get counters(): Readonly<PrimaryCounters> {
    return this.core.counters
  }

  /** The extents that may differ between the replicas (hot or pinned), as byte ranges. */
  hotRanges(): ByteRange[] {
    const extents = new Set([...this.core.hotExtents(), ...this.core.pinnedExtents()])
    const size = this.info.sizeBytes
    const bytes = this.core.extentBytes
    return [...extents]
      .sort((a, b) => a - b)
      .map((extent) => ({ offset: extent * bytes, length: Math.min(bytes, size - extent * bytes) }))
      .filter((range) => range.length > 0)
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return this.options.local.read(offset, length)
  }

  cache(offset: number, length: number): Promise<void> {
    return this.options.local.cache(offset, length)
  }

  allocation(offset: number, length: number, extentsMax: number): Promise<AllocationExtent[]> {
    return this.options.local.allocation(offset, length, extentsMax)
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.mutate({ kind: 'write', offset, length: data.length, fua }, data, undefined)
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.mutate({ kind: 'trim', offset, length, fua }, undefined, undefined)
  }

  zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    if (options.noHole && options.fastZero) {
      // Same answer as the local store would give, before touching either replica.
      return Promise.reject(
        new DuplexError('NOT_SUPPORTED', 'fast zeroing without punching holes is not supported'),
      )
    }
    return this.mutate({ kind: 'zero', offset, length, fua: options.fua }, undefined, options)
  }

  async flush(): Promise<void> {
    await this.admitted('flush', 0)
    return new Promise((resolve, reject) => {
      const requestId = this.nextRequestId++
      this.requests.set(requestId, {
        resolve,
        reject,
        kind: 'flush',
        data: undefined,
        zero: undefined,
        sync: undefined,
        range: { offset: 0, length: 0 },
      })
      this.events.push({ type: 'clientFlush', requestId })
    })
  }

  /** Resolves once no local I/O issued by this volume is running (after `close` or a failure). */
  async idle(): Promise<void> {
    while (this.localInflight > 0) {
      await new Promise<void>((resolve) => this.localIdleWaiters.push(resolve))
    }
  }

  /** Local I/O issued by this driver: counted, so `idle()` can wait for stragglers. */
  private local<T>(io: Promise<T>): Promise<T> {
    this.localInflight += 1
    const done = (): void => {
      this.localInflight -= 1
      if (this.localInflight === 0) for (const wake of this.localIdleWaiters.splice(0)) wake()
    }
    io.then(done, done)
    return io
  }

  /**
   * Keeps the activity log near its target size: when it is over, flush both replicas (so the
   * idle extents' writes are durable on both) and cool the extents the core says are idle.
   */
  private async cool(): Promise<void> {
    const target = this.options.hotExtentsTarget ?? hotExtentsTargetDefault
    if (this.cooling || this.closing || this.failure !== undefined) return
    if (this.core.hotExtents().length <= target || !this.core.isConnected) return
    if (this.options.coolingAllowed?.() === false) return
    this.cooling = true
    try {
      if (this.core.coolable().length === 0) await this.flush()
      const coolable = this.core.coolable()
      // (closing may have been set while the flush ran)
      if (coolable.length > 0 && !this.isClosing()) {
        this.events.push({ type: 'coolExtents', extents: coolable })
      }
    } catch (error) {
      this.options.log.debug('cooling the activity log failed', { error: errorMessage(error) })
    } finally {
      this.cooling = false
    }
  }

  private isClosing(): boolean {
    return this.closing
  }

  /**
   * The owner continues in another volume (a new epoch, degraded or paired again): stop, and
   * fail every pending request with PeerRestarted so that the owner issues it again there. None
   * was acknowledged; their local writes finish before `idle()` resolves. Returns the ranges
   * they change: the peer may lack them.
   */
  handOff(why: string): ByteRange[] {
    const ranges = [...this.requests.values()]
      .map((request) => request.range)
      .filter((range) => range.length > 0)
    this.fail(
      new PeerRestarted(`volume ${this.info.name}: ${why}; requests continue in a new epoch`),
    )
    this.closing = true
    clearInterval(this.coolTimer)
    clearTimeout(this.reconnectTimer)
    this.stream?.close('SHUTTING_DOWN', why)
    return ranges
  }

  /** Stops reconnecting and closes the stream; requests still pending fail. */
  close(): void {
    this.closing = true
    clearInterval(this.coolTimer)
    clearTimeout(this.reconnectTimer)
    this.stream?.close('SHUTTING_DOWN', 'volume closing')
    for (const [, request] of this.requests) {
      request.reject(new DuplexError('SHUTTING_DOWN', `volume ${this.info.name} is closing`))
    }
    this.requests.clear()
  }

  private async mutate(
    op: BlockOp,
    data: Buffer | undefined,
    zero: ZeroOptions | undefined,
  ): Promise<void> {
    if (this.failure !== undefined) throw this.failure
    await this.admitted(op.kind, op.length)
    return new Promise((resolve, reject) => {
      const requestId = this.nextRequestId++
      this.requests.set(requestId, {
        resolve,
        reject,
        kind: op.kind,
        data,
        zero,
        sync: undefined,
        range: { offset: op.offset, length: op.length },
      })
      this.events.push({ type: 'clientWrite', requestId, ...op })
    })
  }

  /**
   * Copies `ranges` of this replica to the peer while client I/O continues (initial sync of an
   * empty or Inconsistent peer). Holes and zeroes are sent as hole punches, data in 1 MiB copies;
   * each copy is ordered against client writes by the core, so a client write to the same range
   * lands on the peer after the copy. Resolves once every copy is acknowledged by the peer.
   * `onCopied` reports each range copied (both replicas hold it, not yet flushed).
   * `rateBytesPerSecond` (0: unlimited) paces the data copies, so that a resync leaves the
   * inter-site link and the disks to the clients.
   */
  async sync(
    ranges: readonly ByteRange[],
    onCopied?: (range: ByteRange) => void,
    rateBytesPerSecond = 0,
  ): Promise<void> {
    const chunks = await this.syncPlan(ranges)
    let next = 0
    // Pacing: data copies start no faster than the rate allows (holes cost nothing to send).
    const started = performance.now()
    let paced = 0
    const pace = async (bytes: number): Promise<void> => {
      if (rateBytesPerSecond <= 0) return
      paced += bytes
      const due = started + (paced / rateBytesPerSecond) * 1000
      const wait = due - performance.now()
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait))
    }
    const worker = async (): Promise<void> => {
      for (let chunk = chunks[next++]; chunk !== undefined; chunk = chunks[next++]) {
        if (!chunk.hole) await pace(chunk.length)
        await this.syncCopy(chunk)
        onCopied?.({ offset: chunk.offset, length: chunk.length })
      }
    }
    await Promise.all(Array.from({ length: syncParallel }, worker))
  }

  /** Splits ranges into copies: data chunks of 1 MiB, hole runs of up to 32 MiB. */
  private async syncPlan(ranges: readonly ByteRange[]): Promise<(ByteRange & { hole: boolean })[]> {
    const out: (ByteRange & { hole: boolean })[] = []
    for (const range of ranges) {
      let offset = range.offset
      const extents = await this.options.local.allocation(range.offset, range.length, 1 << 20)
      for (const extent of extents) {
        const hole = extent.hole || extent.zero
        const step = hole ? syncHoleChunkBytes : syncDataChunkBytes
        for (let at = 0; at < extent.lengthBytes; at += step) {
          out.push({ offset: offset + at, length: Math.min(step, extent.lengthBytes - at), hole })
        }
        offset += extent.lengthBytes
      }
      // The map may report fewer extents than asked for: cover the rest as data.
      for (; offset < range.offset + range.length; offset += syncDataChunkBytes) {
        const length = Math.min(syncDataChunkBytes, range.offset + range.length - offset)
        out.push({ offset, length, hole: false })
      }
    }
    return out
  }

  private async syncCopy(chunk: ByteRange & { hole: boolean }): Promise<void> {
    if (this.failure !== undefined) throw this.failure
    const kind = chunk.hole ? 'zero' : 'write'
    await this.admitted(kind, chunk.length)
    return new Promise((resolve, reject) => {
      const requestId = this.nextRequestId++
      this.requests.set(requestId, {
        resolve,
        reject,
        kind,
        data: undefined,
        zero: undefined,
        sync: { wire: undefined, deferred: undefined },
        range: { offset: chunk.offset, length: chunk.length },
      })
      this.events.push({
        type: 'clientWrite',
        requestId,
        kind,
        offset: chunk.offset,
        length: chunk.length,
        fua: false,
      })
    })
  }

  /** The core issued a sync copy: read what this replica holds there, then let the send go. */
  private captureSync(requestId: RequestId, op: BlockOp, copy: SyncCopy): void {
    const local = this.options.local
    const capture = async (): Promise<{ kind: 'write' | 'zero'; data: Buffer }> => {
      const extents = await local.allocation(op.offset, op.length, 1 << 20)
      const covered = extents.reduce((sum, extent) => sum + extent.lengthBytes, 0)
      if (covered === op.length && extents.every((extent) => extent.hole || extent.zero)) {
        return { kind: 'zero', data: Buffer.alloc(0) }
      }
      return { kind: 'write', data: await local.read(op.offset, op.length) }
    }
    this.local(capture()).then(
      (wire) => {
        copy.wire = wire
        const deferred = copy.deferred
        copy.deferred = undefined
        if (deferred !== undefined) this.performOne(deferred)
        this.events.push({ type: 'localDone', requestId, ok: true })
      },
      (error: unknown) => {
        this.options.log.error('reading a range to sync failed', { error: errorMessage(error) })
        this.events.push({ type: 'localDone', requestId, ok: false })
      },
    )
  }

  /** Back-pressure: waits until the core can take one more request of this size. */
  private async admitted(kind: OpKind | 'flush', length: number): Promise<void> {
    while (!this.core.canAdmit({ kind, length })) {
      await new Promise<void>((resolve) => this.admitWaiters.push(resolve))
    }
  }

  private wakeAdmitWaiters(): void {
    for (const wake of this.admitWaiters.splice(0)) wake()
  }

  private perform(effects: PrimaryEffect[]): void {
    for (const effect of effects) this.performOne(effect)
  }

  private performOne(effect: PrimaryEffect): void {
    switch (effect.type) {
      case 'persistActivityLog':
        this.options.activityLog.persist(effect.extents, effect.coldExtents).then(
          () => {
            this.events.push({
              type: 'activityLogPersisted',
              extents: effect.extents,
              coldExtents: effect.coldExtents,
            })
          },
          (error: unknown) => {
            this.fail(
              new DuplexError(
                'IO_ERROR',
                `activity log of ${this.info.name} cannot be persisted: ${errorMessage(error)}`,
              ),
            )
          },
        )
        return
      case 'writeLocal': {
        const sync = this.requests.get(effect.requestId)?.sync
        if (sync === undefined) this.applyLocal(effect.requestId, effect)
        else this.captureSync(effect.requestId, effect, sync)
        return
      }
      case 'sendToPeer': {
        const request = this.requests.get(effect.requestId)
        const stream = this.stream
        if (stream === undefined || !stream.isOpen) return // re-sent after peerConnected
        const sync = request?.sync
        if (sync !== undefined && sync.wire === undefined) {
          sync.deferred = effect // sent once the read is done
          return
        }
        stream.sendOp(
          {
            epoch: effect.epoch,
            seq: effect.seq,
            kind: sync?.wire?.kind ?? effect.kind,
            offset: effect.offset,
            length: effect.length,
            fua: effect.fua,
            noHole: request?.zero?.noHole ?? false,
          },
          sync?.wire?.data ?? request?.data ?? Buffer.alloc(0),
        )
        if (this.options.onPeerRoundTrip !== undefined)
          this.sentAt.set(effect.seq, performance.now())
        return
      }
      case 'flushLocal':
        this.local(this.options.local.flush()).then(
          () => {
            this.events.push({ type: 'localFlushDone', flushId: effect.flushId, ok: true })
          },
          (error: unknown) => {
            this.options.log.error('local flush failed', { error: errorMessage(error) })
            this.events.push({ type: 'localFlushDone', flushId: effect.flushId, ok: false })
          },
        )
        return
      case 'sendFlushToPeer':
        if (this.stream?.isOpen === true) this.stream.sendFlush(effect.epoch, effect.flushId)
        return
      case 'markDirty':
        this.options.degraded?.dirty.mark(effect.offset, effect.length)
        return
      case 'disconnectPeer':
        this.options.log.warn('dropping the peer stream', { code: effect.code })
        this.stream?.close('RESET', effect.code)
        return
      case 'reply':
        this.settle(effect.requestId, effect.ok ? undefined : effect.code)
        return
      default:
        unreachable(effect)
    }
  }

  private applyLocal(requestId: RequestId, op: BlockOp): void {
    const request = this.requests.get(requestId)
    assert(request !== undefined, `writeLocal for unknown request ${requestId}`)
    const local = this.options.local
    let done: Promise<void>
    switch (op.kind) {
      case 'write':
        assert(request.data !== undefined, 'write without data')
        done = local.write(op.offset, request.data, op.fua)
        break
      case 'trim':
        done = local.trim(op.offset, op.length, op.fua)
        break
      case 'zero':
        done = local.zero(
          op.offset,
          op.length,
          request.zero ?? { fua: op.fua, noHole: false, fastZero: false },
        )
        break
      default:
        unreachable(op.kind)
    }
    this.local(done).then(
      () => {
        this.events.push({ type: 'localDone', requestId, ok: true })
      },
      (error: unknown) => {
        this.options.log.error('local write failed', { error: errorMessage(error) })
        this.events.push({ type: 'localDone', requestId, ok: false })
      },
    )
  }

  private settle(requestId: RequestId, code: ReplicationCode | undefined): void {
    const request = this.requests.get(requestId)
    if (request === undefined) return
    this.requests.delete(requestId)
    if (code === undefined) request.resolve()
    else request.reject(replicationFailure(code, this.info.name))
    this.wakeAdmitWaiters()
  }

  /** Nothing safe is left to do for this volume: fail everything, acknowledge nothing more. */
  private fail(failure: DuplexError): void {
    if (!(failure instanceof PeerRestarted)) {
      this.options.log.error('replicated volume failed', { reason: failure.message })
    }
    this.failure = failure
    for (const [, request] of this.requests) request.reject(failure)
    this.requests.clear()
    this.wakeAdmitWaiters()
  }

  private connect(): void {
    if (this.closing) return
    const { client, peerAddress, nodeName, epoch, incarnation, log } = this.options
    client
      .openStream(
        { volume: this.info.name, epoch, fromNode: nodeName, incarnation },
        {
          onAck: (e, seq) => {
            const sentAt = this.sentAt.get(seq)
            if (sentAt !== undefined) {
              this.sentAt.delete(seq)
              this.options.onPeerRoundTrip?.((performance.now() - sentAt) / 1000)
            }
            this.events.push({ type: 'peerAck', epoch: e, seq })
          },
          onFlushAck: (e, flushId) => {
            this.events.push({ type: 'peerFlushAck', epoch: e, flushId })
          },
          onReject: (e, seq, code) => {
            this.events.push({ type: 'peerError', epoch: e, seq, code })
          },
          onRejectFlush: (e, flushId, code) => {
            this.events.push({ type: 'peerFlushError', epoch: e, flushId, code })
          },
          onClosed: (reason) => {
            this.onStreamClosed(reason)
          },
          onDrained: () => {
            this.wakeAdmitWaiters()
          },
        },
      )
      .then(
        (stream) => {
          this.onStreamOpen(stream)
        },
        (error: unknown) => {
          log.debug('peer stream not open; retrying', {
            peer: peerAddress,
            error: errorMessage(error),
          })
          this.scheduleReconnect()
        },
      )
  }

  private onStreamOpen(stream: PeerStream): void {
    const ack = stream.helloAck
    assert(ack !== undefined, 'stream open without HelloAck')
    if (this.closing) {
      stream.close('SHUTTING_DOWN', 'volume closing')
      return
    }
    if (this.peerIncarnation !== undefined && !ack.incarnation.equals(this.peerIncarnation)) {
      stream.close('RESET', 'peer restarted')
      const restarted = `the secondary of ${this.info.name} restarted`
      this.fail(
        this.options.onPeerRestarted === undefined
          ? new DuplexError('IO_ERROR', `${restarted}; the replicas need a resync`)
          : new PeerRestarted(`${restarted}; requests continue in a new epoch`),
      )
      this.options.onPeerRestarted?.()
      return
    }
    this.peerIncarnation = ack.incarnation
    this.stream = stream
    this.reconnectDelayMs = reconnectDelayMsMin
    this.options.log.info('peer stream open', {
      volume: this.info.name,
      peer: this.options.peerAddress,
    })
    this.events.push({ type: 'peerConnected' })
    this.options.onPeerConnected?.()
  }

  private onStreamClosed(reason: LinkClosed): void {
    if (this.stream === undefined) return
    this.stream = undefined
    this.sentAt.clear() // re-sent ops are timed from their new send
    this.options.log.warn('peer stream closed', {
      volume: this.info.name,
      code: reason.code,
      why: reason.message,
    })
    this.events.push({ type: 'peerDisconnected' })
    this.scheduleReconnect()
  }

  private scheduleReconnect(): void {
    if (this.closing || this.failure !== undefined) return
    clearTimeout(this.reconnectTimer)
    this.reconnectTimer = setTimeout(() => {
      this.connect()
    }, this.reconnectDelayMs)
    this.reconnectDelayMs = Math.min(this.reconnectDelayMs * 2, reconnectDelayMsMax)
  }
}

export interface SecondaryVolumeOptions {
  local: Volume
  epoch: number
  primary: NodeId
  log: Logger
  /** Each op or flush refused (for metrics; the log line is written here). */
  onReject?: (code: ReplicationCode) => void
}

/** The secondary's side: applies the primary's stream through the SecondaryReplication core. */
export class SecondaryVolume {
  private readonly core: SecondaryReplication
  private readonly events: EventQueue<SecondaryEvent>
  /** Payloads of ops being applied, by epoch and seq (the core's effects carry no data). */
  private readonly payloads = new Map<string, { data: Buffer; noHole: boolean }>()
  private replies: PeerReplies | undefined

  constructor(private readonly options: SecondaryVolumeOptions) {
    this.core = new SecondaryReplication({ epoch: options.epoch, primary: options.primary })
    this.events = new EventQueue((event) => {
      this.perform(this.core.step(event))
    })
  }

  get name(): string {
    return this.options.local.name
  }

  get epoch(): number {
    return this.core.epoch
  }

  get counters(): Readonly<SecondaryCounters> {
    return this.core.counters
  }

  /** The volume moved to a newer epoch (persisted by the caller): ops of older ones are refused. */
  advance(epoch: number, primary: NodeId): void {
    this.events.push({ type: 'epochChanged', epoch, primary })
  }

  /** Ends the current stream from the primary, if any. */
  close(reason: string): void {
    this.replies?.close('SHUTTING_DOWN', reason)
    this.replies = undefined
  }

  /** Decides on a new stream from the primary (PeerLinkServer's onStream, for this volume). */
  accept(hello: Hello, replies: PeerReplies): HelloDecision {
    if (hello.epoch < this.core.epoch) {
      return {
        type: 'reject',
        code: 'EPOCH_STALE',
        message: `epoch ${hello.epoch} is stale`,
        epoch: this.core.epoch,
      }
    }
    if (hello.epoch > this.core.epoch) {
      return {
        type: 'reject',
        code: 'EPOCH_AHEAD',
        message: `epoch ${hello.epoch} is unknown here`,
        epoch: this.core.epoch,
      }
    }
    if (hello.fromNode !== this.core.primary) {
      return {
        type: 'reject',
        code: 'WRONG_SENDER',
        message: `${hello.fromNode} is not the primary of ${this.name} (${this.core.primary} is)`,
        epoch: this.core.epoch,
      }
    }
    this.replies?.close('REPLACED', 'a newer stream from the primary replaced this one')
    this.replies = replies
    return {
      type: 'accept',
      epoch: this.core.epoch,
      appliedSeq: this.core.appliedWatermark,
      handler: {
        onOp: (op) => {
          this.receive(hello.fromNode, op)
        },
        onFlush: (flush) => {
          this.events.push({
            type: 'receiveFlush',
            epoch: flush.epoch,
            flushId: flush.flushId,
            from: hello.fromNode,
          })
        },
        onClosed: () => {
          if (this.replies === replies) this.replies = undefined
        },
      },
    }
  }

  private receive(from: NodeId, op: ReceivedOp): void {
    if (op.checksumOk)
      this.payloads.set(`${op.epoch}:${op.seq}`, { data: op.data, noHole: op.noHole })
    this.events.push({
      type: 'receive',
      epoch: op.epoch,
      seq: op.seq,
      from,
      kind: op.kind,
      offset: op.offset,
      length: op.length,
      fua: op.fua,
      checksumOk: op.checksumOk,
    })
  }

  private perform(effects: SecondaryEffect[]): void {
    for (const effect of effects) this.performOne(effect)
  }

  private performOne(effect: SecondaryEffect): void {
    switch (effect.type) {
      case 'writeLocal':
        this.applyLocal(effect)
        return
      case 'flushLocal':
        this.options.local.flush().then(
          () => {
            this.events.push({
              type: 'localFlushDone',
              epoch: effect.epoch,
              flushId: effect.flushId,
              ok: true,
            })
          },
          (error: unknown) => {
            this.options.log.error('local flush failed', { error: errorMessage(error) })
            this.events.push({
              type: 'localFlushDone',
              epoch: effect.epoch,
              flushId: effect.flushId,
              ok: false,
            })
          },
        )
        return
      case 'ack':
        // A re-ack of an already applied duplicate has no writeLocal to consume its payload.
        this.payloads.delete(`${effect.epoch}:${effect.seq}`)
        this.replies?.ack(effect.epoch, effect.seq)
        return
      case 'flushAck':
        this.replies?.flushAck(effect.epoch, effect.flushId)
        return
      case 'reject':
        this.payloads.delete(`${effect.epoch}:${effect.seq}`)
        this.options.log.warn('rejected a replicated op', {
          volume: this.name,
          epoch: effect.epoch,
          seq: effect.seq,
          code: effect.code,
        })
        this.options.onReject?.(effect.code)
        this.replies?.reject(effect.epoch, effect.seq, effect.code, `rejected: ${effect.code}`)
        return
      case 'rejectFlush':
        this.options.log.warn('rejected a replicated flush', {
          volume: this.name,
          epoch: effect.epoch,
          code: effect.code,
        })
        this.options.onReject?.(effect.code)
        this.replies?.rejectFlush(
          effect.epoch,
          effect.flushId,
          effect.code,
          `rejected: ${effect.code}`,
        )
        return
      default:
        unreachable(effect)
    }
  }

  private applyLocal(effect: Extract<SecondaryEffect, { type: 'writeLocal' }>): void {
    const key = `${effect.epoch}:${effect.seq}`
    const payload = this.payloads.get(key)
    this.payloads.delete(key)
    const local = this.options.local
    let done: Promise<void>
    switch (effect.kind) {
      case 'write':
        assert(
          payload !== undefined && payload.data.length === effect.length,
          'write without its payload',
        )
        done = local.write(effect.offset, payload.data, effect.fua)
        break
      case 'trim':
        done = local.trim(effect.offset, effect.length, effect.fua)
        break
      case 'zero':
        done = local.zero(effect.offset, effect.length, {
          fua: effect.fua,
          noHole: payload?.noHole ?? false,
          fastZero: false,
        })
        break
      default:
        unreachable(effect.kind)
    }
    done.then(
      () => {
        this.events.push({ type: 'localDone', epoch: effect.epoch, seq: effect.seq, ok: true })
      },
      (error: unknown) => {
        this.options.log.error('local write failed', { error: errorMessage(error) })
        this.events.push({ type: 'localDone', epoch: effect.epoch, seq: effect.seq, ok: false })
      },
    )
  }
}
