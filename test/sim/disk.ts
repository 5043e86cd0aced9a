/**
 * Simulated storage of one replica: a block device behind a page cache, and a metadata store.
 *
 * `SimDisk` holds, per 512-byte sector, a version: the id of the operation that last wrote it
 * (0: never written). Versions stand for the bytes (the simulator derives content from them), so
 * checks are exact and cheap.
 * - A write lands in the page cache when it is issued (reads see it at once) and is volatile.
 * - `flushStart` (fdatasync) snapshots the writes completed so far; `flushDone` makes them
 *   durable. A FUA write is durable when it completes.
 * - Making a write durable first makes durable every older volatile write sharing a 4 KiB page
 *   with it (writeback writes whole pages), so durable state never goes back behind it.
 * - `crash` keeps the durable state plus a RANDOM SUBSET of the volatile writes, torn at 4 KiB
 *   page granularity, applied in issue order: what a real power cut leaves.
 *
 * `SimMetaStore` models the metadata store (RocksDB) that holds the activity log: a synced
 * batch is durable when it completes; a synced batch in flight at a crash is kept or lost as a
 * whole; unsynced batches are lost on a crash unless a later synced batch completed.
 */
import type { Prng } from '../lib/prng.js'

export const sectorBytes = 512
export const pageBytes = 4096
const sectorsPerPage = pageBytes / sectorBytes

interface VolatileWrite {
  id: number
  version: number
  first: number
  count: number
  completed: boolean
}

export interface FlushToken {
  writes: number[]
}

export class SimDisk {
  readonly sectors: number
  /** What reads see: durable state plus every volatile write, in issue order. */
  readonly cache: Uint32Array
  readonly durable: Uint32Array
  private volatile: VolatileWrite[] = []
  private nextWriteId = 1

  constructor(
    readonly sizeBytes: number,
    private readonly prng: Prng,
  ) {
    if (sizeBytes % pageBytes !== 0) throw new Error('disk size must be whole pages')
    this.sectors = sizeBytes / sectorBytes
    this.cache = new Uint32Array(this.sectors)
    this.durable = new Uint32Array(this.sectors)
  }

  get volatileWrites(): number {
    return this.volatile.length
  }

  /** Issues a write of `version` over a sector-aligned range; returns its handle. */
  write(offset: number, length: number, version: number): number {
    const first = offset / sectorBytes
    const count = length / sectorBytes
    if (!Number.isInteger(first) || !Number.isInteger(count) || first + count > this.sectors) {
      throw new Error(`bad disk range ${offset}+${length}`)
    }
    const id = this.nextWriteId++
    this.volatile.push({ id, version, first, count, completed: false })
    this.cache.fill(version, first, first + count)
    return id
  }

  /** The write's completion; FUA makes it durable now. */
  complete(id: number, fua: boolean): void {
    const index = this.volatile.findIndex((w) => w.id === id)
    const write = this.volatile[index]
    if (write === undefined) return // already made durable by writeback
    write.completed = true
    if (fua) this.makeDurable(index)
  }

  read(offset: number, length: number): Uint32Array {
    const first = offset / sectorBytes
    return this.cache.slice(first, first + length / sectorBytes)
  }

  flushStart(): FlushToken {
    return { writes: this.volatile.filter((w) => w.completed).map((w) => w.id) }
  }

  flushDone(token: FlushToken): void {
    for (const id of token.writes) {
      const index = this.volatile.findIndex((w) => w.id === id)
      if (index >= 0) this.makeDurable(index)
    }
  }

  /** Power cut: durable state plus a random subset of volatile pages; the cache is lost. */
  crash(): void {
    const keep = this.prng.next()
    for (const write of this.volatile) {
      const end = write.first + write.count
      let sector = write.first
      while (sector < end) {
        const pageEnd = Math.min(end, (Math.floor(sector / sectorsPerPage) + 1) * sectorsPerPage)
        if (this.prng.bool(keep)) this.durable.fill(write.version, sector, pageEnd)
        sector = pageEnd
      }
    }
    this.volatile = []
    this.cache.set(this.durable)
  }

  /**
   * Makes the write at `index` durable, with every older volatile write that shares a page with
   * it or (transitively) with one of those: writeback never leaves durable state older than it.
   */
  private makeDurable(index: number): void {
    const target = this.volatile[index]
    if (target === undefined) return
    const pages = new Set<number>()
    const chosen = new Set<number>()
    for (let i = index; i >= 0; i--) {
      const write = this.volatile[i]
      if (write === undefined) continue
      const first = Math.floor(write.first / sectorsPerPage)
      const last = Math.floor((write.first + write.count - 1) / sectorsPerPage)
      let shares = i === index
      for (let page = first; page <= last && !shares; page++) shares = pages.has(page)
      if (!shares) continue
      chosen.add(i)
      for (let page = first; page <= last; page++) pages.add(page)
    }
    const kept: VolatileWrite[] = []
    this.volatile.forEach((write, i) => {
      if (chosen.has(i)) this.durable.fill(write.version, write.first, write.first + write.count)
      else kept.push(write)
    })
    this.volatile = kept
  }
}

export interface MetaBatch {
  put: [string, string][]
  del: string[]
}

interface PendingBatch {
  id: number
  batch: MetaBatch
  sync: boolean
  done: boolean
}

export class SimMetaStore {
  readonly durable = new Map<string, string>()
  /** What reads see: durable plus every written batch. */
  readonly current = new Map<string, string>()
  private pending: PendingBatch[] = []
  private nextId = 1

  constructor(private readonly prng: Prng) {}

  /** Applies the batch to `current` now; `commit(id)` later marks it complete (durable if sync). */
  write(batch: MetaBatch, sync: boolean): number {
    const id = this.nextId++
    apply(this.current, batch)
    this.pending.push({ id, batch, sync, done: false })
    return id
  }

  commit(id: number): void {
    const index = this.pending.findIndex((p) => p.id === id)
    const batch = this.pending[index]
    if (batch === undefined) return
    batch.done = true
    // A synced batch makes everything written before it durable too (one WAL).
    if (batch.sync) this.persistThrough(index)
  }

  crash(): void {
    // Synced batches in flight may or may not have reached the WAL, each as a whole, in order.
    let cut = -1
    for (let i = 0; i < this.pending.length; i++) {
      if (this.pending[i]?.sync === true && this.prng.bool(0.5)) cut = i
    }
    if (cut >= 0) this.persistThrough(cut)
    this.pending = []
    this.current.clear()
    for (const [key, value] of this.durable) this.current.set(key, value)
  }

  private persistThrough(index: number): void {
    const done = this.pending.splice(0, index + 1)
    for (const p of done) apply(this.durable, p.batch)
  }
}

function apply(map: Map<string, string>, batch: MetaBatch): void {
  for (const [key, value] of batch.put) map.set(key, value)
  for (const key of batch.del) map.delete(key)
}
