/**
 * The node's metadata store: a small ordered key-value interface, so that volume records,
 * allocation maps and (later) epochs and activity logs do not depend on RocksDB directly.
 *
 * - `RocksMetaStore`: the real one, `DATA/meta/` in RocksDB. `batch` is atomic; with
 *   `sync: true` it is durable when the promise resolves (WAL fsync).
 * - `MemoryMetaStore`: for unit tests. Keeps every batch in `batchLog` so tests can count syncs.
 *
 * Keys are ASCII strings (asserted); values are Buffers. `scan(prefix)` yields in key order.
 */
import { RocksLevel } from '@nxtedition/rocksdb'
import { assert } from '../core/assert.js'
import { DuplexError, errorMessage } from '../core/errors.js'

export type MetaOp = { type: 'put'; key: string; value: Buffer } | { type: 'del'; key: string }

export interface MetaBatchOptions {
  /** Durable when the promise resolves. */
  sync: boolean
}

export interface MetaStore {
  get(key: string): Promise<Buffer | undefined>
  batch(ops: readonly MetaOp[], options: MetaBatchOptions): Promise<void>
  scan(prefix: string): AsyncIterable<[string, Buffer]>
  close(): Promise<void>
}

/** Key characters allowed: printable ASCII, so byte order equals string order. */
const keyPattern = /^[\x20-\x7e]+$/

function assertKey(key: string): void {
  assert(keyPattern.test(key), `metadata key must be printable ASCII: ${JSON.stringify(key)}`)
}

/** The smallest string greater than every string starting with `prefix` (ASCII only). */
export function prefixEnd(prefix: string): string {
  assertKey(prefix)
  const last = prefix.charCodeAt(prefix.length - 1)
  return prefix.slice(0, -1) + String.fromCharCode(last + 1)
}

export class RocksMetaStore implements MetaStore {
  private constructor(
    private readonly db: RocksLevel,
    readonly location: string,
  ) {}

  static async open(location: string): Promise<RocksMetaStore> {
    const db = new RocksLevel(location, { keyEncoding: 'utf8', valueEncoding: 'buffer' })
    try {
      await db.open()
    } catch (error) {
      throw new DuplexError(
        'IO_ERROR',
        `cannot open the metadata store ${location}: ${errorMessage(error)}`,
        { cause: error },
      )
    }
    return new RocksMetaStore(db, location)
  }

  async get(key: string): Promise<Buffer | undefined> {
    assertKey(key)
    try {
      return await this.db.get(key)
    } catch (error) {
      if ((error as { code?: unknown }).code === 'LEVEL_NOT_FOUND') return undefined
      throw ioError(`read of metadata key ${key}`, error)
    }
  }

  async batch(ops: readonly MetaOp[], options: MetaBatchOptions): Promise<void> {
    if (ops.length === 0) return
    for (const op of ops) assertKey(op.key)
    try {
      await this.db.batch([...ops], { sync: options.sync })
    } catch (error) {
      throw ioError('metadata batch', error)
    }
  }

  async *scan(prefix: string): AsyncIterable<[string, Buffer]> {
    for await (const entry of this.db.iterator({ gte: prefix, lt: prefixEnd(prefix) })) {
      yield entry
    }
  }

  async close(): Promise<void> {
    await this.db.close()
  }
}

function ioError(what: string, error: unknown): DuplexError {
  return new DuplexError('IO_ERROR', `${what} failed: ${errorMessage(error)}`, { cause: error })
}

export interface MemoryBatchRecord {
  ops: MetaOp[]
  sync: boolean
}

export class MemoryMetaStore implements MetaStore {
  private readonly entries = new Map<string, Buffer>()
  /** Every batch applied, in order: lets tests count synced batches (group commit). */
  readonly batchLog: MemoryBatchRecord[] = []
  /** When set, each batch waits for this before applying: lets tests hold a batch in flight. */
  gate: (() => Promise<void>) | undefined
  private closed = false

  get(key: string): Promise<Buffer | undefined> {
    assertKey(key)
    assert(!this.closed, 'metadata store is closed')
    const value = this.entries.get(key)
    return Promise.resolve(value === undefined ? undefined : Buffer.from(value))
  }

  async batch(ops: readonly MetaOp[], options: MetaBatchOptions): Promise<void> {
    assert(!this.closed, 'metadata store is closed')
    for (const op of ops) assertKey(op.key)
    const copy = ops.map((op): MetaOp =>
      op.type === 'put' ? { ...op, value: Buffer.from(op.value) } : op,
    )
    if (this.gate) await this.gate()
    for (const op of copy) {
      if (op.type === 'put') this.entries.set(op.key, op.value)
      else this.entries.delete(op.key)
    }
    this.batchLog.push({ ops: copy, sync: options.sync })
  }

  async *scan(prefix: string): AsyncIterable<[string, Buffer]> {
    assertKey(prefix)
    const keys = [...this.entries.keys()].filter((key) => key.startsWith(prefix)).sort()
    for (const key of keys) {
      const value = this.entries.get(key)
      if (value !== undefined)
        yield await Promise.resolve([key, Buffer.from(value)] as [string, Buffer])
    }
  }

  close(): Promise<void> {
    this.closed = true
    return Promise.resolve()
  }
}
