/**
 * The dirty bitmap of a degraded volume: which chunks (64 KiB by default) the sole owner wrote
 * while its peer was away, so that the peer's resync copies only those. Pure: the owner persists
 * `bits()` lazily (store.ts `setDirtyBits`); after a crash the activity log covers what the last
 * persisted bitmap missed.
 */
import { assert } from '../core/assert.js'

export const dirtyChunkBytesDefault = 64 * 1024

export interface DirtyRange {
  offset: number
  length: number
}

export class DirtyMap {
  private readonly words: Uint8Array
  private readonly chunks: number
  private count = 0
  private changed = false

  constructor(
    readonly sizeBytes: number,
    readonly chunkBytes = dirtyChunkBytesDefault,
    bits?: Uint8Array,
  ) {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes > 0, 'sizeBytes')
    assert(Number.isSafeInteger(chunkBytes) && chunkBytes > 0, 'chunkBytes')
    this.chunks = Math.ceil(sizeBytes / chunkBytes)
    this.words = new Uint8Array(Math.ceil(this.chunks / 8))
    if (bits !== undefined) {
      assert(
        bits.length === this.words.length,
        `dirty bits of ${bits.length} bytes, expected ${this.words.length}`,
      )
      this.words.set(bits)
      for (let chunk = 0; chunk < this.chunks; chunk++) if (this.has(chunk)) this.count++
    }
  }

  /** Bytes of the bitmap for a volume of this size (what `bits()` returns). */
  static bitsLength(sizeBytes: number, chunkBytes = dirtyChunkBytesDefault): number {
    return Math.ceil(Math.ceil(sizeBytes / chunkBytes) / 8)
  }

  /** Marks every chunk the range touches. */
  mark(offset: number, length: number): void {
    if (length === 0) return
    const first = Math.floor(offset / this.chunkBytes)
    const last = Math.min(this.chunks - 1, Math.floor((offset + length - 1) / this.chunkBytes))
    for (let chunk = first; chunk <= last; chunk++) {
      if (this.has(chunk)) continue
      this.set(chunk, true)
      this.count++
      this.changed = true
    }
  }

  /** Clears the chunks that lie wholly inside the range (they were copied). */
  clear(offset: number, length: number): void {
    const first = Math.ceil(offset / this.chunkBytes)
    const end =
      offset + length >= this.sizeBytes
        ? this.chunks
        : Math.floor((offset + length) / this.chunkBytes)
    for (let chunk = first; chunk < end; chunk++) {
      if (!this.has(chunk)) continue
      this.set(chunk, false)
      this.count--
      this.changed = true
    }
  }

  clearAll(): void {
    if (this.count === 0) return
    this.words.fill(0)
    this.count = 0
    this.changed = true
  }

  get dirtyBytes(): number {
    if (this.count === 0) return 0
    const lastPartial = this.has(this.chunks - 1)
      ? this.chunks * this.chunkBytes - this.sizeBytes
      : 0
    return this.count * this.chunkBytes - lastPartial
  }

  get isEmpty(): boolean {
    return this.count === 0
  }

  /** Changed since the last `takeChanges()`. */
  get hasChanges(): boolean {
    return this.changed
  }

  /** A copy of the bits to persist; resets `hasChanges`. */
  takeChanges(): Uint8Array {
    this.changed = false
    return this.words.slice()
  }

  /** The dirty byte ranges, ascending, runs merged. */
  ranges(): DirtyRange[] {
    const out: DirtyRange[] = []
    let runStart = -1
    for (let chunk = 0; chunk <= this.chunks; chunk++) {
      const dirty = chunk < this.chunks && this.has(chunk)
      if (dirty && runStart < 0) runStart = chunk
      if (!dirty && runStart >= 0) {
        const offset = runStart * this.chunkBytes
        out.push({ offset, length: Math.min(chunk * this.chunkBytes, this.sizeBytes) - offset })
        runStart = -1
      }
    }
    return out
  }

  private has(chunk: number): boolean {
    return ((this.words[chunk >> 3] ?? 0) & (1 << (chunk & 7))) !== 0
  }

  private set(chunk: number, value: boolean): void {
    const index = chunk >> 3
    const word = this.words[index] ?? 0
    this.words[index] = value ? word | (1 << (chunk & 7)) : word & ~(1 << (chunk & 7))
  }
}

/** Sorted, merged union of byte ranges. */
export function mergeRanges(ranges: readonly DirtyRange[]): DirtyRange[] {
  const sorted = [...ranges].filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset)
  const out: DirtyRange[] = []
  for (const range of sorted) {
    const last = out[out.length - 1]
    if (last !== undefined && range.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, range.offset + range.length - last.offset)
    } else {
      out.push({ ...range })
    }
  }
  return out
}
