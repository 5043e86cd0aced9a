/**
 * Follow the writer: the policy that moves a volume's primary role to the node that does most of
 * its writing, e.g. after a VM migrated live from one site to the other. Pure: the driver on the
 * primary feeds it every write (`record`) with the time, asks `shouldMove` now and then, performs
 * the handover itself and calls `reset` once the role moved (or when it restarts the policy).
 *
 * Inputs: writes submitted by this node's own clients (`local`) and writes the peer node
 * forwarded to the primary (`forwarded`), with their byte counts.
 *
 * Anti-flapping: a role change costs a handover, so the policy moves only on a clear, lasting
 * signal, and never back and forth:
 * - Share threshold above one half (default 0.9): the peer must have sent at least `shareMin` of
 *   the window's bytes. Both nodes see the same write stream with the roles of `local` and
 *   `forwarded` swapped, so at most one side can pass a threshold above 0.5; a stream split
 *   evenly between the sites moves nothing.
 * - Byte floor (default 64 MiB of forwarded bytes in the window): a trickle from the far site
 *   (a monitoring agent, a log line) while the volume is otherwise idle is no reason to move.
 * - Hold time (default 30 s) after a move and at start: history is forgotten at `reset`, and no
 *   move happens before the hold ends, so the role moves at most once per hold period however the
 *   writes alternate. With the defaults the hold is longer than the window, so a new primary
 *   decides on a full window of its own observations.
 * - One answer per decision: `shouldMove` returns true at most once until `reset`, so a slow
 *   handover is not started twice.
 *
 * Memory is bounded regardless of the write rate: the window is `bucketsPerWindow` time buckets
 * of `windowMs / bucketsPerWindow` each, kept in a ring. The window slides a bucket at a time, so
 * a write counts for between 0.9 and 1.0 `windowMs` after it arrived.
 *
 * Time is the caller's (a monotonic clock); a `nowMs` earlier than one seen before counts as no
 * time passed.
 */
import { assert, assertSafeUint } from '../core/assert.js'
import { DuplexError } from '../core/errors.js'
import { MiB } from '../core/units.js'

export interface FollowTheWriterOptions {
  /** Sliding window length. Default 10_000 ms. */
  windowMs?: number
  /** The peer must have sent at least this fraction of the window's written bytes. Default 0.9. */
  shareMin?: number
  /** ...and at least this many bytes in the window (ignore trickles). Default 64 MiB. */
  bytesMin?: number
  /** After a move (or at start), no move for this long. Default 30_000 ms. */
  holdMs?: number
}

export const followTheWriterDefaults: Required<FollowTheWriterOptions> = {
  windowMs: 10_000,
  shareMin: 0.9,
  bytesMin: 64 * MiB,
  holdMs: 30_000,
}

/** Number of time buckets the window is made of. */
export const bucketsPerWindow = 10

interface Bucket {
  /** `floor(time / bucketMs)` of the writes counted here; a stale index means an empty bucket. */
  index: number
  localBytes: number
  forwardedBytes: number
}

export class FollowTheWriter {
  private readonly shareMin: number
  private readonly bytesMin: number
  private readonly holdMs: number
  private readonly bucketMs: number
  private readonly buckets: Bucket[]
  /** The latest time seen: time never runs backwards inside the policy. */
  private nowMs: number
  private holdUntilMs: number
  /** `shouldMove` said true since the last reset. */
  private decided = false

  constructor(nowMs: number, options: FollowTheWriterOptions = {}) {
    const { windowMs, shareMin, bytesMin, holdMs } = { ...followTheWriterDefaults, ...options }
    requirePositive('windowMs', windowMs)
    requirePositive('bytesMin', bytesMin)
    requirePositive('holdMs', holdMs)
    if (!(shareMin > 0.5 && shareMin <= 1)) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `follow-the-writer shareMin ${shareMin} is not valid: it must be above 0.5 and at most 1`,
      )
    }
    assertTime(nowMs)
    this.shareMin = shareMin
    this.bytesMin = bytesMin
    this.holdMs = holdMs
    this.bucketMs = windowMs / bucketsPerWindow
    this.buckets = Array.from({ length: bucketsPerWindow }, () => ({
      index: -Infinity,
      localBytes: 0,
      forwardedBytes: 0,
    }))
    this.nowMs = nowMs
    this.holdUntilMs = nowMs + holdMs
  }

  /** A write of `bytes` arrived at the primary, from a local client or forwarded by the peer. */
  record(nowMs: number, source: 'local' | 'forwarded', bytes: number): void {
    assertSafeUint(bytes, 'bytes')
    const bucket = this.currentBucket(nowMs)
    if (source === 'local') bucket.localBytes += bytes
    else bucket.forwardedBytes += bytes
  }

  /** Whether to hand the primary role to the peer now; true at most once until `reset()`. */
  shouldMove(nowMs: number): boolean {
    this.advance(nowMs)
    if (this.decided || this.nowMs < this.holdUntilMs) return false
    const { localBytes, forwardedBytes } = this.window(this.nowMs)
    const totalBytes = localBytes + forwardedBytes
    if (forwardedBytes < this.bytesMin || forwardedBytes < this.shareMin * totalBytes) return false
    this.decided = true
    return true
  }

  /** The role moved (or the driver restarted the policy): start a new hold period, forget history. */
  reset(nowMs: number): void {
    this.advance(nowMs)
    for (const bucket of this.buckets) {
      bucket.index = -Infinity
      bucket.localBytes = 0
      bucket.forwardedBytes = 0
    }
    this.holdUntilMs = this.nowMs + this.holdMs
    this.decided = false
  }

  /** For status/metrics: bytes per source in the current window. */
  window(nowMs: number): { localBytes: number; forwardedBytes: number } {
    this.advance(nowMs)
    const newest = this.bucketIndex(this.nowMs)
    let localBytes = 0
    let forwardedBytes = 0
    for (const bucket of this.buckets) {
      if (bucket.index > newest - bucketsPerWindow) {
        localBytes += bucket.localBytes
        forwardedBytes += bucket.forwardedBytes
      }
    }
    return { localBytes, forwardedBytes }
  }

  private advance(nowMs: number): void {
    assertTime(nowMs)
    this.nowMs = Math.max(this.nowMs, nowMs)
  }

  private bucketIndex(timeMs: number): number {
    return Math.floor(timeMs / this.bucketMs)
  }

  /** The bucket for the current time, emptied first if it last held writes of an older round. */
  private currentBucket(nowMs: number): Bucket {
    this.advance(nowMs)
    const index = this.bucketIndex(this.nowMs)
    const slot = ((index % bucketsPerWindow) + bucketsPerWindow) % bucketsPerWindow
    const bucket = this.buckets[slot]
    assert(bucket !== undefined)
    if (bucket.index !== index) {
      assert(bucket.index < index, 'follow-the-writer bucket from the future')
      bucket.index = index
      bucket.localBytes = 0
      bucket.forwardedBytes = 0
    }
    return bucket
  }
}

function requirePositive(name: string, value: number): void {
  if (!Number.isFinite(value) || value <= 0) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `follow-the-writer ${name} ${value} is not valid: it must be a positive finite number`,
    )
  }
}

function assertTime(nowMs: number): void {
  assert(Number.isFinite(nowMs), `time ${nowMs} is not a finite number of milliseconds`)
}
