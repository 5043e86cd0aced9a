/**
 * Synchronous replication of one volume between two replicas: the pure core (no I/O, no clock, no
 * randomness, no `node:` imports). Each event method returns the effects to perform, in order;
 * `step(event)` does the same for a serialized event. Drivers run the effects against the store,
 * the activity log and the peer link, and feed completions back as events.
 *
 * ## PrimaryReplication (this replica is primary in `epoch`)
 *
 * A client write goes through phases: `range` (waits in a `RangeQueue` until no earlier
 * overlapping write is in flight) -> `activityLog` (waits until every extent it touches is hot)
 * -> `window` (waits until its seq fits the peer's window) -> `issued` (`writeLocal` and
 * `sendToPeer` together, one new seq) -> replied once BOTH sides are done.
 *
 * - Events: clientWrite, clientFlush, localDone, localFlushDone, peerAck, peerError,
 *   peerFlushAck, peerFlushError, peerDisconnected, peerConnected, activityLogPersisted,
 *   coolExtents.
 * - Effects: persistActivityLog, writeLocal, sendToPeer, flushLocal, sendFlushToPeer,
 *   disconnectPeer, reply.
 * - Invariants: overlapping writes never run concurrently and are issued in arrival order, so
 *   seq order = arrival order among overlapping writes on both replicas; a write is issued only
 *   once every extent it touches is durably hot; a reply `ok: true` follows both the local
 *   completion and the peer ack of that seq; seqs (and flush ids) grow strictly within the epoch;
 *   at most `inflightOpsMax` requests and `inflightBytesMax` payload bytes are admitted; issued,
 *   unacked seqs span less than `seqWindowMax`; at most one activity-log transaction is in flight.
 * - Back-pressure: the driver asks `canAdmit({kind, length})` before reading a request's payload
 *   and stops reading while it is false; calling `clientWrite`/`clientFlush` past the bound is a
 *   programmer error (assert). No BUSY replies: NBD clients have no good answer to them.
 * - Activity log: transactions are group-committed. Extents needed while one is in flight wait
 *   and go out together in the next `persistActivityLog`. Hot extents stay hot until the driver
 *   cools the ones `coolable()` returns (`coolExtents`, persisted as `coldExtents` of a later
 *   transaction; a write arriving meanwhile re-heats them first).
 * - FLUSH covers the writes completed (both sides done) before it arrived; it does not wait for
 *   writes still in flight (NBD semantics). It is `flushLocal` + `sendFlushToPeer` at once.
 * - Peer disconnected (same epoch): writes are issued locally but not acknowledged; their sends
 *   wait. `peerConnected` re-sends every unacked seq in seq order, then unacked flushes. The
 *   driver must only report `peerConnected` for the same peer incarnation (a peer that restarted
 *   lost its applied-seq memory and its page cache: it needs resync, not re-sends).
 * - Failures: a local or peer `IO_ERROR` fails the request and pins its extents hot (the replicas
 *   may differ there; never coolable). A CHECKSUM_MISMATCH is re-sent up to `peerRetriesMax`
 *   times, then reported as `disconnectPeer` and re-sent after the reconnect: the request never
 *   fails for it, because a seq the peer never applies would hold its watermark back forever.
 *   EPOCH_STALE/WRONG_SENDER from the peer fence this machine: nothing is acknowledged any more,
 *   every request fails with that code. EPOCH_AHEAD, SEQ_OUT_OF_WINDOW, OUT_OF_ORDER drop the
 *   link (`disconnectPeer`). Activity-log persistence failures are not events: the driver
 *   crashes (a synced metadata write that fails leaves nothing safe to do).
 * - Degraded (`degraded: true`, for an epoch in which the witness granted this replica sole
 *   ownership): nothing is sent to a peer; a write completes on its local completion alone and
 *   is reported as `markDirty` before its `writeLocal` (the driver records it in the dirty
 *   bitmap, which the resync of the returning peer copies); a flush is a local flush. Ordering,
 *   the activity log and back-pressure are unchanged. Without the grant a lost peer blocks
 *   replies.
 *
 * ## SecondaryReplication (this replica is secondary in `epoch`, fed by `primary`)
 *
 * - Events: receive, localDone, receiveFlush, localFlushDone, epochChanged.
 * - Effects: writeLocal, flushLocal, ack, flushAck, reject, rejectFlush.
 * - Checks, in order: older epoch -> EPOCH_STALE; newer -> EPOCH_AHEAD (learn it from the witness
 *   first); other sender -> WRONG_SENDER; already applied -> re-ack, no write; in flight -> ignored
 *   (the ack follows); bad checksum -> CHECKSUM_MISMATCH (not recorded, a retry is applied);
 *   beyond the window -> SEQ_OUT_OF_WINDOW; overlapping an admitted op with a higher seq ->
 *   OUT_OF_ORDER.
 * - Ordering: ops are admitted to a `RangeQueue` in arrival order, so overlapping ops apply one
 *   at a time in arrival order, which the OUT_OF_ORDER check makes seq order; non-overlapping
 *   ones run in parallel. (The primary never has two overlapping ops in flight, so this only
 *   guards against a faulty link or primary.) Ops of an older epoch still hold their ranges.
 * - Disk failure: after a local write or flush fails, the disk is `Failed`: every new op and flush
 *   is rejected with IO_ERROR (issue 4 degrades the primary; resync repairs this replica).
 * - Invariants: each (epoch, seq) is written at most once; memory for applied seqs is a
 *   contiguous watermark plus at most `seqWindowMax` seqs above it.
 */
import { assert, assertSafeUint, unreachable } from '../core/assert.js'
import { RangeQueue } from './range-lock.js'
import type {
  ActivityLogTx,
  BlockOp,
  ClientWrite,
  NodeId,
  OpKind,
  PrimaryCounters,
  PrimaryEffect,
  PrimaryEvent,
  ReplicatedOp,
  ReplicationCode,
  RequestId,
  SecondaryCounters,
  SecondaryEffect,
  SecondaryEvent,
} from './replication-types.js'

export type * from './replication-types.js'

const MiB = 1024 * 1024

/** 4 MiB: a crash resyncs at most this much per hot extent; fewer synced AL writes per MiB. */
export const activityLogExtentBytesDefault = 4 * MiB
export const replicationInflightOpsMaxDefault = 1024
export const replicationInflightBytesMaxDefault = 64 * MiB
/** A protocol constant: primary and secondary must agree on it. */
export const replicationSeqWindowMaxDefault = 4096
export const replicationPeerRetriesMaxDefault = 3

// =============================================================================================
// Primary

export interface PrimaryOptions {
  epoch: number
  extentBytes?: number
  inflightOpsMax?: number
  inflightBytesMax?: number
  seqWindowMax?: number
  /** Re-sends of one seq after CHECKSUM_MISMATCH before the request fails. */
  peerRetriesMax?: number
  /** Extents the persisted activity log holds hot (loaded at start). */
  hotExtents?: Iterable<number>
  /** Sole owner by a witness grant: complete on the local side alone, report `markDirty`. */
  degraded?: boolean
}

type WritePhase = 'range' | 'activityLog' | 'window' | 'issued'
type Side = 'pending' | 'ok' | 'failed'
/** Peer side of an issued write or flush: `unsent` waits for a connection. */
type PeerSide = 'unsent' | 'sent' | 'ok' | 'failed'

interface PrimaryWrite {
  request: ClientWrite
  rangeId: number
  phase: WritePhase
  extents: number[]
  seq: number
  local: Side
  peer: PeerSide
  peerCode: ReplicationCode | undefined
  retries: number
  /** Fenced before issue: replied already; its range is released as soon as it runs. */
  cancelled: boolean
}

interface PrimaryFlush {
  requestId: RequestId
  flushId: number
  /** Completion stamp of the last write this flush covers. */
  coversStamp: number
  local: Side
  peer: PeerSide
  peerCode: ReplicationCode | undefined
}

/** hot: durably hot; persistingHot / cooling: in the in-flight transaction. Absent: cold. */
type ExtentState = 'hot' | 'persistingHot' | 'cooling'

export class PrimaryReplication {
  readonly epoch: number
  readonly extentBytes: number
  readonly inflightOpsMax: number
  readonly inflightBytesMax: number
  readonly seqWindowMax: number
  readonly peerRetriesMax: number
  /** Sole owner: no peer; writes complete locally and are reported dirty. */
  readonly degraded: boolean
  readonly counters: PrimaryCounters = {
    staleAcks: 0,
    unknownAcks: 0,
    checksumRetries: 0,
    peerResets: 0,
  }

  private connected = false
  private fencedBy: ReplicationCode | undefined
  private readonly range: RangeQueue
  private readonly writes = new Map<RequestId, PrimaryWrite>()
  private readonly byRange = new Map<number, PrimaryWrite>()
  /** Issued writes whose peer side is not done, in seq order (Map keeps insertion order). */
  private readonly unacked = new Map<number, PrimaryWrite>()
  private readonly windowQueue: PrimaryWrite[] = []
  private readonly alQueue: PrimaryWrite[] = []
  private readonly flushes = new Map<number, PrimaryFlush>()
  private readonly flushRequests = new Set<RequestId>()
  private nextSeq = 1
  private nextFlushId = 1
  private payloadBytes = 0

  private readonly extentStates = new Map<number, ExtentState>()
  private readonly alWantHot = new Set<number>()
  private readonly alWantCold = new Set<number>()
  private alTx: ActivityLogTx | undefined
  /** Extents where the replicas may differ (a failed request): never coolable here. */
  private readonly pinned = new Set<number>()
  /** Per extent, the completion stamp of its last non-FUA write (not durable until flushed). */
  private readonly unflushedStamp = new Map<number, number>()
  private completionStamp = 0
  private durableStamp = 0

  private out: PrimaryEffect[] = []

  constructor(options: PrimaryOptions) {
    assertSafeUint(options.epoch, 'epoch')
    this.epoch = options.epoch
    this.extentBytes = options.extentBytes ?? activityLogExtentBytesDefault
    this.inflightOpsMax = options.inflightOpsMax ?? replicationInflightOpsMaxDefault
    this.inflightBytesMax = options.inflightBytesMax ?? replicationInflightBytesMaxDefault
    this.seqWindowMax = options.seqWindowMax ?? replicationSeqWindowMaxDefault
    this.peerRetriesMax = options.peerRetriesMax ?? replicationPeerRetriesMaxDefault
    this.degraded = options.degraded ?? false
    assert(this.extentBytes > 0 && Number.isSafeInteger(this.extentBytes), 'extentBytes')
    assert(Number.isSafeInteger(this.inflightOpsMax) && this.inflightOpsMax >= 1, 'inflightOpsMax')
    assert(this.inflightBytesMax >= 1, 'inflightBytesMax')
    assert(Number.isSafeInteger(this.seqWindowMax) && this.seqWindowMax >= 1, 'seqWindowMax')
    assertSafeUint(this.peerRetriesMax, 'peerRetriesMax')
    this.range = new RangeQueue(this.inflightOpsMax)
    // Extents hot in the persisted log at start may differ between the replicas (we crashed or
    // stopped with writes in them): they stay pinned hot until a resync clears them (issue 4).
    // Cooling them would erase the only record of where the replicas may differ.
    for (const extent of options.hotExtents ?? []) {
      this.extentStates.set(extent, 'hot')
      this.pinned.add(extent)
    }
  }

  // ---- queries

  /** False: the driver must stop reading requests until an effect frees room. */
  /** Write payload bytes issued and not yet done on both replicas (metrics). */
  get inflightPayloadBytes(): number {
    return this.payloadBytes
  }

  canAdmit(request: { kind: OpKind | 'flush'; length: number }): boolean {
    if (this.fencedBy !== undefined) return true // every request fails at once
    if (this.writes.size + this.flushRequests.size >= this.inflightOpsMax) return false
    if (request.kind !== 'write' || this.payloadBytes === 0) return true
    return this.payloadBytes + request.length <= this.inflightBytesMax
  }

  get isConnected(): boolean {
    return this.connected
  }

  get fenced(): ReplicationCode | undefined {
    return this.fencedBy
  }

  get inflightOps(): number {
    return this.writes.size + this.flushRequests.size
  }

  get inflightBytes(): number {
    return this.payloadBytes
  }

  /** Durably hot extents (after a crash, what resync must compare), ascending. */
  hotExtents(): number[] {
    return sorted([...this.extentStates].filter(([, s]) => s !== 'persistingHot').map(([e]) => e))
  }

  pinnedExtents(): number[] {
    return sorted(this.pinned)
  }

  /**
   * Hot extents that may be persisted cold: no admitted write touches them, no failed request
   * pinned them, and every write into them is durable on both sides (FUA, or covered by a flush
   * completed on both sides). Ascending.
   */
  coolable(): number[] {
    const busy = new Set<number>()
    for (const write of this.writes.values()) {
      for (const extent of this.extentsOf(write.request)) busy.add(extent)
    }
    const out: number[] = []
    for (const [extent, state] of this.extentStates) {
      if (state !== 'hot' || busy.has(extent) || this.pinned.has(extent)) continue
      if (this.alWantCold.has(extent)) continue
      if ((this.unflushedStamp.get(extent) ?? 0) > this.durableStamp) continue
      out.push(extent)
    }
    return sorted(out)
  }

  // ---- events

  step(event: PrimaryEvent): PrimaryEffect[] {
    switch (event.type) {
      case 'clientWrite':
        return this.clientWrite(event)
      case 'clientFlush':
        return this.clientFlush(event)
      case 'localDone':
        return this.localDone(event)
      case 'localFlushDone':
        return this.localFlushDone(event)
      case 'peerAck':
        return this.peerAck(event)
      case 'peerError':
        return this.peerError(event)
      case 'peerFlushAck':
        return this.peerFlushAck(event)
      case 'peerFlushError':
        return this.peerFlushError(event)
      case 'peerDisconnected':
        return this.peerDisconnected()
      case 'peerConnected':
        return this.peerConnected()
      case 'activityLogPersisted':
        return this.activityLogPersisted(event)
      case 'coolExtents':
        return this.coolExtents(event)
      default:
        return unreachable(event)
    }
  }

  clientWrite(input: ClientWrite): PrimaryEffect[] {
    const request: ClientWrite = {
      requestId: input.requestId,
      offset: input.offset,
      length: input.length,
      fua: input.fua,
      kind: input.kind,
    }
    assertSafeUint(request.offset, 'offset')
    assertSafeUint(request.length, 'length')
    assertSafeUint(request.offset + request.length, 'range end')
    this.assertNewRequest(request.requestId)
    if (this.fencedBy !== undefined) {
      return [{ type: 'reply', requestId: request.requestId, ok: false, code: this.fencedBy }]
    }
    assert(this.canAdmit(request), 'clientWrite past the in-flight bound: check canAdmit first')
    const admitted = this.range.submit(request.offset, request.length)
    assert(admitted.state !== 'full', 'range queue full below inflightOpsMax')
    const write: PrimaryWrite = {
      request,
      rangeId: admitted.id,
      phase: 'range',
      extents: this.extentsOf(request),
      seq: 0,
      local: 'pending',
      peer: 'unsent',
      peerCode: undefined,
      retries: 0,
      cancelled: false,
    }
    this.writes.set(request.requestId, write)
    this.byRange.set(write.rangeId, write)
    if (request.kind === 'write') this.payloadBytes += request.length
    if (admitted.state === 'running') this.started(write)
    return this.drain()
  }

  clientFlush(input: { requestId: RequestId }): PrimaryEffect[] {
    this.assertNewRequest(input.requestId)
    if (this.fencedBy !== undefined) {
      return [{ type: 'reply', requestId: input.requestId, ok: false, code: this.fencedBy }]
    }
    assert(this.canAdmit({ kind: 'flush', length: 0 }), 'clientFlush past the in-flight bound')
    const flush: PrimaryFlush = {
      requestId: input.requestId,
      flushId: this.nextFlushId++,
      coversStamp: this.completionStamp,
      local: 'pending',
      peer: 'unsent',
      peerCode: undefined,
    }
    this.flushes.set(flush.flushId, flush)
    this.flushRequests.add(flush.requestId)
    this.out.push({ type: 'flushLocal', flushId: flush.flushId })
    if (this.degraded) flush.peer = 'ok'
    else if (this.connected) this.sendFlush(flush)
    return this.drain()
  }

  localDone(input: { requestId: RequestId; ok: boolean }): PrimaryEffect[] {
    const write = this.writes.get(input.requestId)
    assert(write !== undefined, `localDone for unknown request ${input.requestId}`)
    assert(write.phase === 'issued' && write.local === 'pending', 'localDone twice or too early')
    write.local = input.ok ? 'ok' : 'failed'
    this.maybeFinish(write)
    return this.drain()
  }

  localFlushDone(input: { flushId: number; ok: boolean }): PrimaryEffect[] {
    const flush = this.flushes.get(input.flushId)
    assert(flush?.local === 'pending', `localFlushDone for unknown flush ${input.flushId}`)
    flush.local = input.ok ? 'ok' : 'failed'
    this.maybeFinishFlush(flush)
    return this.drain()
  }

  peerAck(input: { epoch: number; seq: number }): PrimaryEffect[] {
    const write = this.awaitingPeer(input.epoch, input.seq)
    if (write === undefined) return this.drain()
    write.peer = 'ok'
    this.unacked.delete(write.seq)
    this.maybeFinish(write)
    return this.drain()
  }

  peerError(input: { epoch: number; seq: number; code: ReplicationCode }): PrimaryEffect[] {
    const write = this.awaitingPeer(input.epoch, input.seq)
    if (write === undefined) return this.drain()
    switch (input.code) {
      case 'CHECKSUM_MISMATCH':
        // Never a failed request: a seq the peer skipped would stall its watermark. Retry, then
        // report by dropping the link; the reconnect re-sends it.
        if (!this.connected) break
        if (write.retries < this.peerRetriesMax) {
          write.retries += 1
          this.counters.checksumRetries += 1
          this.send(write)
        } else {
          write.retries = 0
          this.resetPeer(input.code)
        }
        break
      case 'IO_ERROR':
        this.peerFailed(write, input.code)
        break
      case 'EPOCH_STALE':
      case 'WRONG_SENDER':
        this.fence(input.code)
        break
      case 'EPOCH_AHEAD':
      case 'SEQ_OUT_OF_WINDOW':
      case 'OUT_OF_ORDER':
        this.resetPeer(input.code)
        break
      default:
        unreachable(input.code)
    }
    return this.drain()
  }

  peerFlushAck(input: { epoch: number; flushId: number }): PrimaryEffect[] {
    const flush = this.awaitingPeerFlush(input.epoch, input.flushId)
    if (flush === undefined) return this.drain()
    flush.peer = 'ok'
    this.maybeFinishFlush(flush)
    return this.drain()
  }

  peerFlushError(input: {
    epoch: number
    flushId: number
    code: ReplicationCode
  }): PrimaryEffect[] {
    const flush = this.awaitingPeerFlush(input.epoch, input.flushId)
    if (flush === undefined) return this.drain()
    switch (input.code) {
      case 'EPOCH_STALE':
      case 'WRONG_SENDER':
        this.fence(input.code)
        break
      case 'EPOCH_AHEAD':
      case 'SEQ_OUT_OF_WINDOW':
      case 'OUT_OF_ORDER':
        this.resetPeer(input.code)
        break
      case 'IO_ERROR':
      case 'CHECKSUM_MISMATCH':
        flush.peer = 'failed'
        flush.peerCode = input.code
        this.maybeFinishFlush(flush)
        break
      default:
        unreachable(input.code)
    }
    return this.drain()
  }

  peerDisconnected(): PrimaryEffect[] {
    this.markDisconnected()
    return this.drain()
  }

  /** The peer stream is up again in the same epoch, with the same peer incarnation. */
  peerConnected(): PrimaryEffect[] {
    assert(!this.connected, 'peerConnected while connected')
    assert(!this.degraded, 'a degraded primary has no peer stream')
    this.connected = true
    if (this.fencedBy !== undefined) return this.drain()
    for (const write of this.unacked.values()) {
      if (write.peer === 'unsent') this.send(write)
    }
    for (const flush of this.flushes.values()) {
      if (flush.peer === 'unsent') this.sendFlush(flush)
    }
    return this.drain()
  }

  activityLogPersisted(input: ActivityLogTx): PrimaryEffect[] {
    const tx = this.alTx
    assert(tx !== undefined, 'activityLogPersisted without a transaction in flight')
    assert(
      sameNumbers(tx.extents, input.extents) && sameNumbers(tx.coldExtents, input.coldExtents),
      'activityLogPersisted for another transaction',
    )
    this.alTx = undefined
    for (const extent of tx.extents) this.extentStates.set(extent, 'hot')
    for (const extent of tx.coldExtents) this.extentStates.delete(extent)
    const waiting = this.alQueue.splice(0)
    for (const write of waiting) {
      if (this.allHot(write.extents)) this.toWindow(write)
      else this.alQueue.push(write)
    }
    return this.drain()
  }

  /** Persist these extents cold (each must be in `coolable()`); a later transaction does it. */
  coolExtents(input: { extents: number[] }): PrimaryEffect[] {
    const coolable = new Set(this.coolable())
    for (const extent of input.extents) {
      assert(coolable.has(extent), `extent ${extent} is not coolable`)
      this.alWantCold.add(extent)
    }
    return this.drain()
  }

  // ---- internals

  private assertNewRequest(requestId: RequestId): void {
    assertSafeUint(requestId, 'requestId')
    assert(
      !this.writes.has(requestId) && !this.flushRequests.has(requestId),
      `request ${requestId} already in flight`,
    )
  }

  private extentsOf(op: BlockOp): number[] {
    if (op.length === 0) return []
    const first = Math.floor(op.offset / this.extentBytes)
    const last = Math.floor((op.offset + op.length - 1) / this.extentBytes)
    const out: number[] = []
    for (let extent = first; extent <= last; extent++) out.push(extent)
    return out
  }

  private allHot(extents: number[]): boolean {
    return extents.every((extent) => this.extentStates.get(extent) === 'hot')
  }

  /** The write now holds its range: make its extents hot, then issue. */
  private started(write: PrimaryWrite): void {
    if (write.cancelled) {
      this.releaseRange(write)
      return
    }
    assert(this.fencedBy === undefined, 'a write started after the fence')
    let ready = true
    for (const extent of write.extents) {
      const state = this.extentStates.get(extent)
      if (state === 'hot') {
        this.alWantCold.delete(extent) // a pending cool is cancelled: the extent stays hot
        continue
      }
      ready = false
      // Cold, or cooling in the in-flight transaction: the next transaction re-heats it.
      if (state !== 'persistingHot') this.alWantHot.add(extent)
    }
    if (ready) {
      this.toWindow(write)
    } else {
      write.phase = 'activityLog'
      this.alQueue.push(write)
    }
  }

  private windowAllows(): boolean {
    const oldest = firstKey(this.unacked)
    return oldest === undefined || this.nextSeq < oldest + this.seqWindowMax
  }

  private toWindow(write: PrimaryWrite): void {
    write.phase = 'window'
    if (this.windowQueue.length === 0 && this.windowAllows()) this.issue(write)
    else this.windowQueue.push(write)
  }

  private issue(write: PrimaryWrite): void {
    write.phase = 'issued'
    write.seq = this.nextSeq++
    if (this.degraded) {
      const { offset, length } = write.request
      write.peer = 'ok'
      this.out.push({ type: 'markDirty', offset, length })
      this.out.push({ type: 'writeLocal', ...write.request })
      return
    }
    this.unacked.set(write.seq, write)
    this.out.push({ type: 'writeLocal', ...write.request })
    if (this.connected) this.send(write)
  }

  private send(write: PrimaryWrite): void {
    const { requestId, offset, length, fua, kind } = write.request
    write.peer = 'sent'
    this.out.push({
      type: 'sendToPeer',
      epoch: this.epoch,
      seq: write.seq,
      requestId,
      offset,
      length,
      fua,
      kind,
    })
  }

  private sendFlush(flush: PrimaryFlush): void {
    flush.peer = 'sent'
    this.out.push({ type: 'sendFlushToPeer', epoch: this.epoch, flushId: flush.flushId })
  }

  private awaitingPeer(epoch: number, seq: number): PrimaryWrite | undefined {
    if (epoch !== this.epoch) {
      this.counters.staleAcks += 1
      return undefined
    }
    const write = this.unacked.get(seq)
    // An unsent write may still be acked: an answer from the previous stream is genuine.
    if (write === undefined) this.counters.unknownAcks += 1
    return write
  }

  private awaitingPeerFlush(epoch: number, flushId: number): PrimaryFlush | undefined {
    if (epoch !== this.epoch) {
      this.counters.staleAcks += 1
      return undefined
    }
    const flush = this.flushes.get(flushId)
    if (flush === undefined || flush.peer === 'ok' || flush.peer === 'failed') {
      this.counters.unknownAcks += 1
      return undefined
    }
    return flush
  }

  private peerFailed(write: PrimaryWrite, code: ReplicationCode): void {
    write.peer = 'failed'
    write.peerCode = code
    this.unacked.delete(write.seq)
    this.maybeFinish(write)
  }

  private markDisconnected(): void {
    this.connected = false
    for (const write of this.unacked.values()) write.peer = 'unsent'
    for (const flush of this.flushes.values()) {
      if (flush.peer === 'sent') flush.peer = 'unsent'
    }
  }

  private resetPeer(code: ReplicationCode): void {
    if (!this.connected) return
    this.counters.peerResets += 1
    this.markDisconnected()
    this.out.push({ type: 'disconnectPeer', code })
  }

  /** The peer serves a newer epoch or another primary: this machine acknowledges nothing more. */
  private fence(code: ReplicationCode): void {
    if (this.fencedBy !== undefined) return
    this.fencedBy = code
    this.alQueue.length = 0
    this.windowQueue.length = 0
    this.alWantHot.clear()
    const all = [...this.writes.values()]
    const notIssued = all.filter((write) => write.phase !== 'issued')
    // Cancel them all first: releasing one range may start another.
    for (const write of notIssued) write.cancelled = true
    for (const write of notIssued) {
      // Nothing was written anywhere: fail it now; a queued one releases its range when it runs.
      this.reply(write.request.requestId, code)
      this.forget(write)
      if (write.phase !== 'range') this.releaseRange(write)
    }
    for (const write of all) {
      const open = write.peer === 'unsent' || write.peer === 'sent'
      if (write.phase === 'issued' && open && this.writes.has(write.request.requestId)) {
        this.peerFailed(write, code)
      }
    }
    for (const flush of [...this.flushes.values()]) {
      if (flush.peer !== 'ok') {
        flush.peer = 'failed'
        flush.peerCode = code
        this.maybeFinishFlush(flush)
      }
    }
  }

  private maybeFinish(write: PrimaryWrite): void {
    if (write.local === 'pending' || write.peer === 'unsent' || write.peer === 'sent') return
    const failed = write.local === 'failed' || write.peer === 'failed'
    if (failed) {
      for (const extent of write.extents) this.pinned.add(extent)
      const code: ReplicationCode =
        write.local === 'failed' ? 'IO_ERROR' : (write.peerCode ?? 'IO_ERROR')
      this.reply(write.request.requestId, code)
    } else {
      this.completionStamp += 1
      if (!write.request.fua) {
        for (const extent of write.extents) this.unflushedStamp.set(extent, this.completionStamp)
      }
      this.out.push({ type: 'reply', requestId: write.request.requestId, ok: true })
    }
    this.forget(write)
    this.releaseRange(write)
    this.drainWindow()
  }

  private maybeFinishFlush(flush: PrimaryFlush): void {
    if (flush.local === 'pending' || flush.peer === 'unsent' || flush.peer === 'sent') return
    this.flushes.delete(flush.flushId)
    this.flushRequests.delete(flush.requestId)
    if (flush.local === 'failed') {
      this.reply(flush.requestId, 'IO_ERROR')
    } else if (flush.peer === 'failed') {
      this.reply(flush.requestId, flush.peerCode ?? 'IO_ERROR')
    } else {
      this.durableStamp = Math.max(this.durableStamp, flush.coversStamp)
      this.out.push({ type: 'reply', requestId: flush.requestId, ok: true })
    }
  }

  private reply(requestId: RequestId, code: ReplicationCode): void {
    this.out.push({ type: 'reply', requestId, ok: false, code })
  }

  private forget(write: PrimaryWrite): void {
    this.writes.delete(write.request.requestId)
    if (write.request.kind === 'write') this.payloadBytes -= write.request.length
  }

  /** Completes the write's range; starts the writes it was holding back. */
  private releaseRange(write: PrimaryWrite): void {
    this.byRange.delete(write.rangeId)
    for (const id of this.range.complete(write.rangeId)) {
      const next = this.byRange.get(id)
      assert(next !== undefined, `range op ${id} has no write`)
      this.started(next)
    }
  }

  private drainWindow(): void {
    while (this.windowQueue.length > 0 && this.windowAllows()) {
      const write = this.windowQueue.shift()
      assert(write !== undefined)
      this.issue(write)
    }
  }

  /** Ends a step: group-commits wanted activity-log changes, returns the effects. */
  private drain(): PrimaryEffect[] {
    this.drainWindow()
    if (this.alTx === undefined && (this.alWantHot.size > 0 || this.alWantCold.size > 0)) {
      const tx: ActivityLogTx = {
        extents: sorted(this.alWantHot),
        coldExtents: sorted(this.alWantCold),
      }
      this.alWantHot.clear()
      this.alWantCold.clear()
      for (const extent of tx.extents) this.extentStates.set(extent, 'persistingHot')
      for (const extent of tx.coldExtents) this.extentStates.set(extent, 'cooling')
      this.alTx = tx
      this.out.push({ type: 'persistActivityLog', ...tx })
    }
    const effects = this.out
    this.out = []
    return effects
  }
}

// =============================================================================================
// Secondary

export interface SecondaryOptions {
  epoch: number
  primary: NodeId
  seqWindowMax?: number
}

interface SecondaryWrite {
  op: BlockOp
  epoch: number
  seq: number
  rangeId: number
  running: boolean
}

export class SecondaryReplication {
  readonly seqWindowMax: number
  readonly counters: SecondaryCounters = {
    rejected: {
      EPOCH_STALE: 0,
      EPOCH_AHEAD: 0,
      WRONG_SENDER: 0,
      CHECKSUM_MISMATCH: 0,
      IO_ERROR: 0,
      SEQ_OUT_OF_WINDOW: 0,
      OUT_OF_ORDER: 0,
    },
    duplicatesApplied: 0,
    duplicatesInflight: 0,
    retiredCompletions: 0,
  }

  private currentEpoch: number
  private currentPrimary: NodeId
  /** Every seq <= watermark of the current epoch is applied. */
  private watermark = 0
  /** Applied seqs above the watermark; fewer than `seqWindowMax`. */
  private readonly appliedAbove = new Set<number>()
  private readonly range: RangeQueue
  /** Admitted writes (any epoch), by `epoch:seq`. */
  private readonly inflight = new Map<string, SecondaryWrite>()
  private readonly byRange = new Map<number, SecondaryWrite>()
  private readonly flushesInflight = new Set<string>()
  private diskFailed = false

  constructor(options: SecondaryOptions) {
    assertSafeUint(options.epoch, 'epoch')
    this.currentEpoch = options.epoch
    this.currentPrimary = options.primary
    this.seqWindowMax = options.seqWindowMax ?? replicationSeqWindowMaxDefault
    assert(Number.isSafeInteger(this.seqWindowMax) && this.seqWindowMax >= 1, 'seqWindowMax')
    // In-flight seqs of the current epoch lie in the window; older epochs' drain away.
    this.range = new RangeQueue(2 * this.seqWindowMax)
  }

  get epoch(): number {
    return this.currentEpoch
  }

  get primary(): NodeId {
    return this.currentPrimary
  }

  get appliedWatermark(): number {
    return this.watermark
  }

  get appliedAboveCount(): number {
    return this.appliedAbove.size
  }

  get inflightCount(): number {
    return this.inflight.size
  }

  get isDiskFailed(): boolean {
    return this.diskFailed
  }

  isApplied(seq: number): boolean {
    return seq <= this.watermark || this.appliedAbove.has(seq)
  }

  step(event: SecondaryEvent): SecondaryEffect[] {
    switch (event.type) {
      case 'receive':
        return this.receive(event)
      case 'localDone':
        return this.localDone(event)
      case 'receiveFlush':
        return this.receiveFlush(event)
      case 'localFlushDone':
        return this.localFlushDone(event)
      case 'epochChanged':
        return this.epochChanged(event)
      default:
        return unreachable(event)
    }
  }

  /** A replicated op; the driver validated its shape and checked the payload's xxh64. */
  receive(input: ReplicatedOp): SecondaryEffect[] {
    const { epoch, seq } = input
    const op: BlockOp = {
      offset: input.offset,
      length: input.length,
      fua: input.fua,
      kind: input.kind,
    }
    assertSafeUint(seq, 'seq')
    assert(seq >= 1, 'seq starts at 1')
    assertSafeUint(op.offset + op.length, 'range end')
    const refused = this.checkSender(epoch, input.from)
    if (refused !== undefined) return [this.reject(epoch, seq, refused)]
    if (this.isApplied(seq)) {
      this.counters.duplicatesApplied += 1
      return [{ type: 'ack', epoch, seq }]
    }
    if (this.inflight.has(key(epoch, seq))) {
      this.counters.duplicatesInflight += 1
      return []
    }
    if (this.diskFailed) return [this.reject(epoch, seq, 'IO_ERROR')]
    if (!input.checksumOk) return [this.reject(epoch, seq, 'CHECKSUM_MISMATCH')]
    if (seq > this.watermark + this.seqWindowMax) {
      return [this.reject(epoch, seq, 'SEQ_OUT_OF_WINDOW')]
    }
    if (this.overtakes(epoch, seq, op)) return [this.reject(epoch, seq, 'OUT_OF_ORDER')]
    const admitted = this.range.submit(op.offset, op.length)
    assert(admitted.state !== 'full', 'secondary range queue full inside the window')
    const write: SecondaryWrite = { op, epoch, seq, rangeId: admitted.id, running: false }
    this.inflight.set(key(epoch, seq), write)
    this.byRange.set(write.rangeId, write)
    const out: SecondaryEffect[] = []
    if (admitted.state === 'running') this.run(write, out)
    return out
  }

  localDone(input: { epoch: number; seq: number; ok: boolean }): SecondaryEffect[] {
    const k = key(input.epoch, input.seq)
    const write = this.inflight.get(k)
    assert(write?.running === true, `localDone for ${k}, which is not being written`)
    this.inflight.delete(k)
    this.byRange.delete(write.rangeId)
    const out: SecondaryEffect[] = []
    if (input.epoch !== this.currentEpoch) {
      this.counters.retiredCompletions += 1
    } else if (input.ok) {
      this.markApplied(input.seq)
      out.push({ type: 'ack', epoch: input.epoch, seq: input.seq })
    } else {
      this.diskFailed = true
      out.push(this.reject(input.epoch, input.seq, 'IO_ERROR'))
    }
    for (const id of this.range.complete(write.rangeId)) {
      const next = this.byRange.get(id)
      assert(next !== undefined, `range op ${id} has no write`)
      this.run(next, out)
    }
    return out
  }

  receiveFlush(input: { epoch: number; flushId: number; from: NodeId }): SecondaryEffect[] {
    const { epoch, flushId } = input
    assertSafeUint(flushId, 'flushId')
    const refused = this.checkSender(epoch, input.from)
    if (refused !== undefined) {
      this.counters.rejected[refused] += 1
      return [{ type: 'rejectFlush', epoch, flushId, code: refused }]
    }
    if (this.diskFailed) {
      this.counters.rejected.IO_ERROR += 1
      return [{ type: 'rejectFlush', epoch, flushId, code: 'IO_ERROR' }]
    }
    // A flush is idempotent: a re-sent one after completion simply syncs again.
    if (this.flushesInflight.has(key(epoch, flushId))) return []
    this.flushesInflight.add(key(epoch, flushId))
    return [{ type: 'flushLocal', epoch, flushId }]
  }

  localFlushDone(input: { epoch: number; flushId: number; ok: boolean }): SecondaryEffect[] {
    const { epoch, flushId } = input
    assert(this.flushesInflight.delete(key(epoch, flushId)), `unknown flush ${flushId}`)
    if (epoch !== this.currentEpoch) return []
    if (input.ok) return [{ type: 'flushAck', epoch, flushId }]
    this.diskFailed = true
    this.counters.rejected.IO_ERROR += 1
    return [{ type: 'rejectFlush', epoch, flushId, code: 'IO_ERROR' }]
  }

  /** The witness (or an admin) moved the volume to a newer epoch; seqs restart. */
  epochChanged(input: { epoch: number; primary: NodeId }): SecondaryEffect[] {
    assertSafeUint(input.epoch, 'epoch')
    if (input.epoch === this.currentEpoch) {
      assert(input.primary === this.currentPrimary, 'two primaries in one epoch')
      return []
    }
    assert(input.epoch > this.currentEpoch, 'epochs only grow')
    this.currentEpoch = input.epoch
    this.currentPrimary = input.primary
    this.watermark = 0
    this.appliedAbove.clear()
    return []
  }

  private checkSender(epoch: number, from: NodeId): ReplicationCode | undefined {
    if (epoch < this.currentEpoch) return 'EPOCH_STALE'
    if (epoch > this.currentEpoch) return 'EPOCH_AHEAD'
    if (from !== this.currentPrimary) return 'WRONG_SENDER'
    return undefined
  }

  private reject(epoch: number, seq: number, code: ReplicationCode): SecondaryEffect {
    this.counters.rejected[code] += 1
    return { type: 'reject', epoch, seq, code }
  }

  /** An admitted op of this epoch with a higher seq overlaps `op`: applying it now reorders. */
  private overtakes(epoch: number, seq: number, op: BlockOp): boolean {
    for (const other of this.inflight.values()) {
      if (other.epoch !== epoch || other.seq < seq) continue
      if (
        other.op.offset < op.offset + op.length &&
        op.offset < other.op.offset + other.op.length
      ) {
        return true
      }
    }
    return false
  }

  private run(write: SecondaryWrite, out: SecondaryEffect[]): void {
    write.running = true
    out.push({ type: 'writeLocal', epoch: write.epoch, seq: write.seq, ...write.op })
  }

  private markApplied(seq: number): void {
    this.appliedAbove.add(seq)
    while (this.appliedAbove.delete(this.watermark + 1)) this.watermark += 1
    assert(this.appliedAbove.size < this.seqWindowMax, 'applied set beyond the window')
  }
}

// =============================================================================================

function key(epoch: number, id: number): string {
  return `${epoch}:${id}`
}

function sorted(values: Iterable<number>): number[] {
  return [...values].sort((a, b) => a - b)
}

function sameNumbers(a: number[], b: number[]): boolean {
  return a.length === b.length && a.every((value, index) => value === b[index])
}

function firstKey<K>(map: Map<K, unknown>): K | undefined {
  for (const k of map.keys()) return k
  return undefined
}
