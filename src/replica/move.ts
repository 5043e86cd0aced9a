/**
 * Moving a replica to another node of its domain (`duplex volume move`, `duplex node drain`):
 * the copy's bookkeeping, pure (the driver is src/daemon/mover.ts; the deterministic simulation
 * test/sim/move.test.ts runs this against concurrent writes).
 *
 * The replica that moves (the source) copies itself to the new node (the target) while it keeps
 * serving as one of the volume's two replicas, so the volume never has fewer than two current
 * copies. It is a pre-copy, as in live migration of a virtual machine's memory:
 *
 * 1. Every byte range starts dirty. Each pass takes the dirty ranges (clearing them) and copies
 *    them; a write that lands on the source meanwhile marks its range dirty again. The mark is
 *    made when the write has finished, before its range lock is released (volume.ts
 *    `observeChanges`): a copy that reads the range after the mark sees the new bytes, and one
 *    that read it before is followed by another copy. Marking when a write starts would lose it:
 *    the pass could take the mark, read the old bytes and never look again.
 * 2. When little is left (`readyForCutover`), the primary pauses client writes and drains what
 *    is in flight, the source copies the rest (then nothing can be dirty), the target makes the
 *    copy durable and takes the source's replica record, and the witness records the new pair.
 *    The pause lasts as long as copying the rest, which is why the passes try to shrink it.
 *
 * Holes: the target starts empty, so the first pass skips what the source's allocation map calls
 * a hole; later passes punch holes that appeared.
 */
import { DirtyMap } from './dirty-map.js'
import type { DirtyRange } from './dirty-map.js'

const MiB = 1024 * 1024

export interface MoveCopyOptions {
  /** Granularity of the dirty tracking. */
  chunkBytes: number
  /** Cut over when at most this much is left (the pause copies it). */
  cutoverBytes: number
  /** After this many passes, cut over with up to `cutoverBytesMax` left (writes outpace the copy). */
  passesMax: number
  cutoverBytesMax: number
}

export const moveCopyDefaults: MoveCopyOptions = {
  chunkBytes: 64 * 1024,
  cutoverBytes: 16 * MiB,
  passesMax: 8,
  cutoverBytesMax: 256 * MiB,
}

export class MoveCopy {
  private readonly dirty: DirtyMap
  private passCount = 0

  constructor(
    readonly sizeBytes: number,
    private readonly options: MoveCopyOptions = moveCopyDefaults,
  ) {
    this.dirty = new DirtyMap(sizeBytes, options.chunkBytes)
    this.dirty.mark(0, sizeBytes)
  }

  /** The source's bytes in this range changed (a write finished): copy them again. */
  changed(offset: number, length: number): void {
    this.dirty.mark(offset, length)
  }

  /** A copy of these ranges failed: they are dirty again. */
  failed(ranges: readonly DirtyRange[]): void {
    for (const range of ranges) this.dirty.mark(range.offset, range.length)
  }

  /** The ranges to copy now; they count as clean until a change or a failure marks them again. */
  takePass(): DirtyRange[] {
    const ranges = this.dirty.ranges()
    this.dirty.clearAll()
    this.passCount += 1
    return ranges
  }

  /** Passes taken so far; the first one may skip holes (the target starts empty). */
  get passes(): number {
    return this.passCount
  }

  get remainingBytes(): number {
    return this.dirty.dirtyBytes
  }

  /** Whether what is left is small enough to copy while the primary holds client writes. */
  readyForCutover(): boolean {
    if (this.passCount === 0) return false
    const left = this.dirty.dirtyBytes
    if (left <= this.options.cutoverBytes) return true
    return this.passCount >= this.options.passesMax && left <= this.options.cutoverBytesMax
  }
}
