/**
 * A FIFO of received byte chunks from which whole protocol units (a header, a payload) are taken.
 * Taking a unit that lies inside one chunk is zero-copy; one that spans chunks is copied once.
 * Pure: the socket driver pushes what it reads and takes what it needs.
 */
import { assert } from '../core/assert.js'

export class ByteQueue {
  private chunks: Buffer[] = []
  private head = 0 // offset into chunks[0]
  private total = 0

  get length(): number {
    return this.total
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return
    this.chunks.push(chunk)
    this.total += chunk.length
  }

  /** Removes and returns exactly `n` bytes; the caller checks `length` first. */
  take(n: number): Buffer {
    assert(n <= this.total, 'ByteQueue.take beyond what is queued')
    if (n === 0) return Buffer.alloc(0)
    const first = this.chunks[0]
    assert(first !== undefined)
    if (first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n)
      this.advance(n)
      return out
    }
    const out = Buffer.allocUnsafe(n)
    let written = 0
    while (written < n) {
      const chunk = this.chunks[0]
      assert(chunk !== undefined)
      const count = Math.min(chunk.length - this.head, n - written)
      chunk.copy(out, written, this.head, this.head + count)
      written += count
      this.advance(count)
    }
    return out
  }

  /** Discards up to `n` bytes and returns how many were discarded. */
  skip(n: number): number {
    let skipped = 0
    while (skipped < n && this.total > 0) {
      const chunk = this.chunks[0]
      assert(chunk !== undefined)
      const count = Math.min(chunk.length - this.head, n - skipped)
      this.advance(count)
      skipped += count
    }
    return skipped
  }

  private advance(n: number): void {
    const first = this.chunks[0]
    assert(first !== undefined)
    this.head += n
    this.total -= n
    if (this.head === first.length) {
      this.chunks.shift()
      this.head = 0
    }
  }
}
