/**
 * Keeps one volume's allocation map durable in the metadata store, so that block status stays
 * truthful across crashes (ARCHITECTURE invariant 5: never a hole over data).
 *
 * Rules:
 * - Mark before write: `ensureAllocated` persists every not-yet-allocated chunk of a range with a
 *   SYNCED batch before the caller writes data there. Chunks whose mark is still in flight are
 *   `pending`; a second writer into a pending chunk waits for the same batch. A range whose
 *   chunks are all durably allocated costs nothing: `ensureAllocated` returns undefined.
 * - Group commit: one batch is in flight at a time; marks that arrive meanwhile are coalesced
 *   into the next batch (one fsync for many writers).
 * - Unmark after durable punch: `noteTrimmed` clears fully covered chunks in memory at once (block
 *   status may report the hole now), but the persisted map keeps them allocated until an
 *   fdatasync of the data file that started after the punch completes (`flushStarted` /
 *   `flushCompleted`); only then are they written, unsynced. Otherwise a synced mark batch could
 *   make "unallocated" durable while the punch itself is still volatile, and a crash would leave
 *   old data under a persisted hole.
 * - Each batch writes whole-segment snapshots taken when the batch is built, batches are applied
 *   in order, so the last write of a segment always carries the latest state.
 */
import { assert } from '../core/assert.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { AllocationMap } from './allocation-map.js'
import type { MetaOp, MetaStore } from './meta-store.js'

interface Waiter {
  resolve: () => void
  reject: (error: unknown) => void
}

interface NextBatch {
  chunks: number[]
  waiters: Waiter[]
  sync: boolean
  promise: Promise<void>
}

export class AllocationJournal {
  /** Chunks set in the map whose synced mark has not completed: chunk -> that batch. */
  private readonly pending = new Map<number, Promise<void>>()
  /** Trimmed chunks still persisted as allocated: chunk -> trim epoch of the punch. */
  private readonly trimmedVolatile = new Map<number, number>()
  private trimEpoch = 0
  /** Segments to rewrite in the next batch. */
  private readonly dirtySegments = new Set<number>()
  private next: NextBatch | undefined
  private inFlight: Promise<void> | undefined
  /** Synced batches issued: for tests and metrics. */
  syncedBatches = 0

  constructor(
    private readonly meta: MetaStore,
    private readonly map: AllocationMap,
    private readonly segmentKey: (segment: number) => string,
  ) {}

  /**
   * Makes every chunk of [offset, offset + length) durably allocated. Undefined when it already
   * is (the hot path: no await), else a promise that resolves once the synced batch is done.
   */
  ensureAllocated(offset: number, length: number): Promise<void> | undefined {
    const missing = this.map.chunksToMark(offset, length)
    const waits = new Set<Promise<void>>()
    if (this.pending.size > 0 && length > 0) {
      const first = Math.floor(offset / this.map.chunkBytes)
      const end = Math.ceil((offset + length) / this.map.chunkBytes)
      for (let chunk = first; chunk < end; chunk++) {
        const waiting = this.pending.get(chunk)
        if (waiting !== undefined) waits.add(waiting)
      }
    }
    if (missing.length > 0) waits.add(this.mark(missing))
    if (waits.size === 0) return undefined
    if (waits.size === 1) return [...waits][0]
    return Promise.all(waits).then(() => undefined)
  }

  /** After a punch of [offset, offset + length) completed: frees the fully covered chunks. */
  noteTrimmed(offset: number, length: number): void {
    const covered = this.map.chunksFullyCovered(offset, length)
    if (covered.length === 0) return
    this.trimEpoch += 1
    const freed: number[] = []
    for (const chunk of covered) {
      // Writers into a covered chunk overlap the trim's range, so the range lock has ordered
      // them: none can still be waiting for its mark.
      assert(!this.pending.has(chunk), `trimmed chunk ${chunk} has a mark in flight`)
      if (!this.map.isAllocated(chunk)) continue
      freed.push(chunk)
      if (!this.trimmedVolatile.has(chunk)) this.trimmedVolatile.set(chunk, this.trimEpoch)
    }
    // The persisted encoding (map + trimmedVolatile) does not change: nothing to write yet.
    this.map.markUnallocated(freed)
  }

  /** Call when an fdatasync of the data file starts; pass the token to `flushCompleted`. */
  flushStarted(): number {
    return this.trimEpoch
  }

  /** The fdatasync started with `token` succeeded: punches before it are durable. */
  flushCompleted(token: number): void {
    for (const [chunk, epoch] of this.trimmedVolatile) {
      if (epoch > token) continue
      this.trimmedVolatile.delete(chunk)
      this.dirtySegments.add(Math.floor(chunk / this.map.segmentChunks))
    }
    if (this.dirtySegments.size > 0) this.kick()
  }

  /** Writes everything outstanding with a synced batch and waits for it. */
  async sync(): Promise<void> {
    this.nextBatch().sync = true
    this.kick()
    while (this.inFlight !== undefined || this.next !== undefined) {
      await (this.inFlight ?? this.next?.promise)
    }
  }

  private mark(chunks: number[]): Promise<void> {
    const batch = this.nextBatch()
    batch.sync = true
    batch.chunks.push(...chunks)
    for (const chunk of chunks) {
      this.trimmedVolatile.delete(chunk)
      this.pending.set(chunk, batch.promise)
    }
    for (const segment of this.map.markAllocated(chunks)) this.dirtySegments.add(segment)
    this.kick()
    return batch.promise
  }

  private nextBatch(): NextBatch {
    if (this.next !== undefined) return this.next
    const waiters: Waiter[] = []
    const promise = new Promise<void>((resolve, reject) => waiters.push({ resolve, reject }))
    // Nobody may be awaiting a lazy (unsynced) batch: keep a rejection from going unhandled.
    promise.catch(() => undefined)
    this.next = { chunks: [], waiters, sync: false, promise }
    return this.next
  }

  private kick(): void {
    if (this.inFlight !== undefined) return
    if (this.next === undefined && this.dirtySegments.size === 0) return
    const batch = this.next ?? this.nextBatch()
    this.next = undefined
    const segments = [...this.dirtySegments].sort((a, b) => a - b)
    this.dirtySegments.clear()
    const volatile = this.volatileBySegment(new Set(segments))
    const ops = segments.map((segment) => this.segmentOp(segment, volatile.get(segment)))
    if (batch.sync) this.syncedBatches += 1
    this.inFlight = this.meta
      .batch(ops, { sync: batch.sync })
      .then(
        () => {
          for (const chunk of batch.chunks) this.pending.delete(chunk)
          for (const waiter of batch.waiters) waiter.resolve()
        },
        (error: unknown) => {
          this.failed(batch, segments, error)
        },
      )
      .finally(() => {
        this.inFlight = undefined
        this.kick()
      })
  }

  private failed(batch: NextBatch, segments: number[], error: unknown): void {
    for (const segment of segments) this.dirtySegments.add(segment)
    for (const chunk of batch.chunks) this.pending.delete(chunk)
    // No data was written into these chunks (their writers were waiting): forget the marks, but
    // keep them persisted as allocated until a flush, since some may have been trimmed volatile.
    this.trimEpoch += 1
    for (const chunk of batch.chunks) this.trimmedVolatile.set(chunk, this.trimEpoch)
    this.map.markUnallocated(batch.chunks)
    const wrapped = new DuplexError(
      'IO_ERROR',
      `cannot persist the allocation map: ${errorMessage(error)}`,
      { cause: error },
    )
    for (const waiter of batch.waiters) waiter.reject(wrapped)
  }

  /** The persisted form of a segment: the map plus trimmed chunks whose punch is not durable. */
  private segmentOp(segment: number, volatile: number[] | undefined): MetaOp {
    const key = this.segmentKey(segment)
    let bits = this.map.encodeSegment(segment)
    for (const chunk of volatile ?? []) {
      bits ??= new Uint8Array(this.map.segmentBytes)
      const local = chunk % this.map.segmentChunks
      bits[local >> 3] = (bits[local >> 3] ?? 0) | (1 << (local & 7))
    }
    if (bits === undefined) return { type: 'del', key }
    return { type: 'put', key, value: Buffer.from(bits.buffer, bits.byteOffset, bits.length) }
  }

  private volatileBySegment(segments: Set<number>): Map<number, number[]> {
    const out = new Map<number, number[]>()
    for (const chunk of this.trimmedVolatile.keys()) {
      const segment = Math.floor(chunk / this.map.segmentChunks)
      if (!segments.has(segment)) continue
      const list = out.get(segment)
      if (list === undefined) out.set(segment, [chunk])
      else list.push(chunk)
    }
    return out
  }
}
