/**
 * Which chunks of a volume may hold data (pure: no I/O, no `node:` imports).
 *
 * State: one bit per chunk (`chunkBytes`, 1 MiB by default); 1 = allocated (may hold non-zero
 * data), 0 = unallocated (reads as zeros). Bits are grouped in segments of `segmentChunks` chunks
 * (4096 by default: 512 bytes of bitmap per 256 MiB of volume). Only segments with at least one
 * bit set are kept, so memory follows written data, not volume size; each segment is one
 * metadata key, so a change rewrites 512 bytes, not the whole map.
 *
 * Events: `markAllocated(chunks)` and `markUnallocated(chunks)`; each returns the segments whose
 * bits changed, which the caller persists with `encodeSegment`.
 *
 * Invariant (ARCHITECTURE 5), kept by the caller: a chunk holding non-zero data is allocated,
 * durably, before the data is written; so `extents` may report allocated over zeros but never a
 * hole over data. Partial chunks are never unallocated: `chunksFullyCovered` returns only chunks
 * that a trim wholly covers (the last chunk of a volume may be short).
 */
import type { AllocationExtent } from '../nbd/exports.js'
import { assert, assertSafeUint } from '../core/assert.js'
import { DuplexError } from '../core/errors.js'

/**
 * 1 MiB: coarse enough that a fresh volume under random writes needs few synced marks (each
 * first write into a chunk waits for one), fine enough for sparse copies to skip holes.
 */
export const allocationChunkBytesDefault = 1024 * 1024
export const allocationSegmentChunksDefault = 4096

export interface AllocationMapOptions {
  sizeBytes: number
  chunkBytes?: number
  segmentChunks?: number
}

interface Segment {
  bits: Uint8Array
  /** Bits set: a segment at zero is dropped. */
  allocatedChunks: number
}

export class AllocationMap {
  readonly sizeBytes: number
  readonly chunkBytes: number
  readonly segmentChunks: number
  readonly chunkCount: number
  readonly segmentCount: number
  /** Encoded size of one segment. */
  readonly segmentBytes: number
  private readonly segments = new Map<number, Segment>()
  private allocatedTotal = 0

  constructor(options: AllocationMapOptions) {
    const chunkBytes = options.chunkBytes ?? allocationChunkBytesDefault
    const segmentChunks = options.segmentChunks ?? allocationSegmentChunksDefault
    assertSafeUint(options.sizeBytes, 'sizeBytes')
    assert(chunkBytes > 0 && (chunkBytes & (chunkBytes - 1)) === 0, 'chunkBytes: a power of two')
    assert(segmentChunks > 0 && segmentChunks % 8 === 0, 'segmentChunks: a multiple of 8')
    this.sizeBytes = options.sizeBytes
    this.chunkBytes = chunkBytes
    this.segmentChunks = segmentChunks
    this.chunkCount = Math.ceil(options.sizeBytes / chunkBytes)
    this.segmentCount = Math.ceil(this.chunkCount / segmentChunks)
    this.segmentBytes = segmentChunks / 8
  }

  /** Chunks that hold at least one allocated bit. */
  get allocatedChunkCount(): number {
    return this.allocatedTotal
  }

  isAllocated(chunk: number): boolean {
    this.assertChunk(chunk)
    const segment = this.segments.get(Math.floor(chunk / this.segmentChunks))
    if (segment === undefined) return false
    const local = chunk % this.segmentChunks
    return ((byteAt(segment.bits, local >> 3) >> (local & 7)) & 1) === 1
  }

  /** Chunks touched by [offset, offset + length) that are not allocated yet, ascending. */
  chunksToMark(offset: number, length: number): number[] {
    const { first, end } = this.touchedChunks(offset, length)
    const out: number[] = []
    for (let chunk = first; chunk < end; chunk++) {
      if (!this.isAllocated(chunk)) out.push(chunk)
    }
    return out
  }

  /** Chunks lying wholly inside [offset, offset + length), ascending (a trim may free them). */
  chunksFullyCovered(offset: number, length: number): number[] {
    this.assertRange(offset, length)
    const end = offset + length
    const first = Math.ceil(offset / this.chunkBytes)
    // The last chunk may be short: it is covered when the range reaches the end of the volume.
    const endChunk = end === this.sizeBytes ? this.chunkCount : Math.floor(end / this.chunkBytes)
    const out: number[] = []
    for (let chunk = first; chunk < endChunk; chunk++) out.push(chunk)
    return out
  }

  /** Sets the bits; returns the segments that changed, ascending. */
  markAllocated(chunks: Iterable<number>): number[] {
    return this.setBits(chunks, true)
  }

  /** Clears the bits; returns the segments that changed, ascending. */
  markUnallocated(chunks: Iterable<number>): number[] {
    return this.setBits(chunks, false)
  }

  /**
   * Runs of [offset, offset + length) in order, clipped to the range, adjacent runs of the same
   * kind merged, at most `extentsMax` of them (the last one may then end before the range does).
   */
  extents(offset: number, length: number, extentsMax: number): AllocationExtent[] {
    this.assertRange(offset, length)
    assert(Number.isSafeInteger(extentsMax) && extentsMax >= 1, 'extentsMax must be >= 1')
    const end = offset + length
    const out: AllocationExtent[] = []
    let position = offset
    while (position < end && out.length < extentsMax) {
      const chunk = Math.floor(position / this.chunkBytes)
      const allocated = this.isAllocated(chunk)
      const limitChunk = Math.ceil(end / this.chunkBytes)
      const changeChunk = this.nextChange(chunk + 1, allocated, limitChunk)
      const runEnd = Math.min(changeChunk * this.chunkBytes, end)
      out.push({ lengthBytes: runEnd - position, hole: !allocated, zero: !allocated })
      position = runEnd
    }
    return out
  }

  /** Non-empty segments, ascending. */
  segmentIndexes(): number[] {
    return [...this.segments.keys()].sort((a, b) => a - b)
  }

  /** The segment's bitmap, or undefined when it has no bit set (delete its key). */
  encodeSegment(index: number): Uint8Array | undefined {
    assert(Number.isSafeInteger(index) && index >= 0 && index < this.segmentCount, 'segment index')
    const segment = this.segments.get(index)
    return segment === undefined ? undefined : segment.bits.slice()
  }

  /** Loads a persisted segment; throws STORE_CORRUPT if it cannot belong to this volume. */
  loadSegment(index: number, bytes: Uint8Array): void {
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.segmentCount) {
      throw corrupt(`segment ${index} is beyond the volume's ${this.segmentCount} segments`)
    }
    if (bytes.length !== this.segmentBytes) {
      throw corrupt(`segment ${index} is ${bytes.length} bytes, expected ${this.segmentBytes}`)
    }
    const chunks: number[] = []
    for (let local = 0; local < this.segmentChunks; local++) {
      if (((byteAt(bytes, local >> 3) >> (local & 7)) & 1) === 0) continue
      const chunk = index * this.segmentChunks + local
      if (chunk >= this.chunkCount) {
        throw corrupt(
          `segment ${index} marks chunk ${chunk}, beyond the volume's ${this.chunkCount}`,
        )
      }
      chunks.push(chunk)
    }
    this.markAllocated(chunks)
  }

  private setBits(chunks: Iterable<number>, value: boolean): number[] {
    const changed = new Set<number>()
    for (const chunk of chunks) {
      this.assertChunk(chunk)
      const index = Math.floor(chunk / this.segmentChunks)
      let segment = this.segments.get(index)
      if (segment === undefined) {
        if (!value) continue
        segment = { bits: new Uint8Array(this.segmentBytes), allocatedChunks: 0 }
        this.segments.set(index, segment)
      }
      const local = chunk % this.segmentChunks
      const mask = 1 << (local & 7)
      const byte = byteAt(segment.bits, local >> 3)
      if (((byte & mask) !== 0) === value) continue
      segment.bits[local >> 3] = value ? byte | mask : byte & ~mask
      const delta = value ? 1 : -1
      segment.allocatedChunks += delta
      this.allocatedTotal += delta
      if (segment.allocatedChunks === 0) this.segments.delete(index)
      changed.add(index)
    }
    return [...changed].sort((a, b) => a - b)
  }

  /** The first chunk in [from, limit) whose state differs from `allocated`, or `limit`. */
  private nextChange(from: number, allocated: boolean, limit: number): number {
    let chunk = from
    while (chunk < limit) {
      const index = Math.floor(chunk / this.segmentChunks)
      const segmentEnd = Math.min((index + 1) * this.segmentChunks, limit)
      const segment = this.segments.get(index)
      if (segment === undefined) {
        if (allocated) return chunk
        chunk = segmentEnd
        continue
      }
      const sameByte = allocated ? 0xff : 0
      while (chunk < segmentEnd) {
        const local = chunk - index * this.segmentChunks
        if ((local & 7) === 0 && chunk + 8 <= segmentEnd) {
          if (byteAt(segment.bits, local >> 3) === sameByte) {
            chunk += 8
            continue
          }
        }
        const bit = (byteAt(segment.bits, local >> 3) >> (local & 7)) & 1
        if ((bit === 1) !== allocated) return chunk
        chunk += 1
      }
    }
    return limit
  }

  private touchedChunks(offset: number, length: number): { first: number; end: number } {
    this.assertRange(offset, length)
    if (length === 0) return { first: 0, end: 0 }
    return {
      first: Math.floor(offset / this.chunkBytes),
      end: Math.ceil((offset + length) / this.chunkBytes),
    }
  }

  private assertRange(offset: number, length: number): void {
    assertSafeUint(offset, 'offset')
    assertSafeUint(length, 'length')
    assert(offset + length <= this.sizeBytes, 'range beyond the end of the volume')
  }

  private assertChunk(chunk: number): void {
    assert(Number.isSafeInteger(chunk) && chunk >= 0 && chunk < this.chunkCount, `chunk ${chunk}`)
  }
}

function byteAt(bits: Uint8Array, index: number): number {
  const byte = bits[index]
  assert(byte !== undefined, 'bitmap index out of range')
  return byte
}

function corrupt(message: string): DuplexError {
  return new DuplexError('STORE_CORRUPT', `allocation map: ${message}`)
}
