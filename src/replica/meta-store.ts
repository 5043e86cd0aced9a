/**
 * The node's metadata store: a small ordered key-value interface, so that volume records,
 * allocation maps and (later) epochs and activity logs do not depend on RocksDB directly.
 *
 * - `RocksMetaStore`: the real one, `DATA/meta/` in RocksDB. `batch` is atomic; with
 *   `sync: true` it is durable when the promise resolves (WAL fsync). RocksDB runs in a worker
 *   thread (meta-worker.ts): `@nxtedition/rocksdb` writes a batch synchronously on the calling
 *   thread, so a synced batch would block the event loop for the whole fsync (~2-3 ms) and stall
 *   every NBD connection. This thread only posts calls and awaits replies; the worker runs them
 *   one at a time in the order posted, so batches apply in the order `batch` was called. If the
 *   worker dies, every call in flight and every later call fails with IO_ERROR.
 * - `MemoryMetaStore`: for unit tests. Keeps every batch in `batchLog` so tests can count syncs.
 *
 * Keys are ASCII strings (asserted); values are Buffers. `scan(prefix)` yields in key order.
 */
import { Worker } from 'node:worker_threads'
import { assert } from '../core/assert.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import type {
  MetaCall,
  MetaReply,
  MetaRequest,
  MetaValue,
  ScanPage,
  WireError,
  WireOp,
} from './meta-worker.js'

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

/** The main thread's end of the worker protocol: posts calls, settles them by reply id. */
class MetaWorkerClient {
  private readonly worker = new Worker(new URL('./meta-worker.js', import.meta.url), {
    execArgv: workerExecArgv(process.execArgv),
  })
  private readonly pending = new Map<number, PendingCall>()
  private nextId = 1
  /** Set once the worker can take no more calls: it crashed, or it was terminated. */
  private gone: DuplexError | undefined
  crashed = false

  constructor() {
    // Idle, the worker must not keep the process alive (an open RocksDB never did); while calls
    // are pending it is referenced (see `call`), so none is lost to an exiting event loop.
    this.worker.unref()
    this.worker.on('message', (reply: MetaReply) => {
      this.settle(reply)
    })
    this.worker.on('error', (error) => {
      this.crash(`the metadata worker failed: ${errorMessage(error)}`, error)
    })
    this.worker.on('messageerror', (error) => {
      this.crash(`the metadata worker sent an unreadable reply: ${errorMessage(error)}`, error)
    })
    this.worker.on('exit', (code) => {
      this.crash(`the metadata worker exited (code ${code})`, undefined)
    })
  }

  /** Resolves with the worker's value; rejects with its error, or IO_ERROR if it is gone. */
  call(call: MetaCall): Promise<MetaValue> {
    if (this.gone !== undefined) return Promise.reject(this.gone)
    const id = this.nextId++
    return new Promise<MetaValue>((resolve, reject) => {
      this.pending.set(id, { resolve, reject })
      if (this.pending.size === 1) this.worker.ref()
      const request: MetaRequest = { ...call, id }
      this.worker.postMessage(request)
    })
  }

  /** Stops the worker; calls still pending and later calls fail with IO_ERROR. */
  async terminate(): Promise<void> {
    this.gone ??= new DuplexError('IO_ERROR', 'the metadata store is closed')
    await this.worker.terminate()
    this.rejectPending(this.gone)
  }

  private settle(reply: MetaReply): void {
    const pending = this.pending.get(reply.id)
    assert(pending !== undefined, `metadata worker replied to unknown call ${reply.id}`)
    this.forget(reply.id)
    if (reply.ok) pending.resolve(reply.value)
    else pending.reject(workerError(reply.error))
  }

  private crash(message: string, cause: unknown): void {
    if (this.gone !== undefined) return
    this.crashed = true
    this.gone = new DuplexError('IO_ERROR', message, { cause })
    this.rejectPending(this.gone)
  }

  private rejectPending(error: DuplexError): void {
    for (const [id, pending] of this.pending) {
      this.forget(id)
      pending.reject(error)
    }
  }

  private forget(id: number): void {
    this.pending.delete(id)
    if (this.pending.size === 0) this.worker.unref()
  }
}

/**
 * The process's node flags minus `--input-type`, which a worker inherits but refuses for a file
 * entry point (ERR_INPUT_TYPE_NOT_ALLOWED, e.g. under `node --input-type=module -e ...`).
 */
function workerExecArgv(execArgv: readonly string[]): string[] {
  const out: string[] = []
  for (let i = 0; i < execArgv.length; i++) {
    const arg = execArgv[i] ?? ''
    if (arg === '--input-type')
      i += 1 // its value is the next argument
    else if (!arg.startsWith('--input-type=')) out.push(arg)
  }
  return out
}

interface PendingCall {
  resolve: (value: MetaValue) => void
  reject: (error: unknown) => void
}

/** A worker's error as an Error again, with its code and cause: the `cause` of our IO_ERROR. */
function workerError(wire: WireError): Error {
  const cause = wire.cause === undefined ? {} : { cause: workerError(wire.cause) }
  const error = new Error(wire.message, cause)
  return wire.code === undefined ? error : Object.assign(error, { code: wire.code })
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

function asScanPage(value: MetaValue): ScanPage {
  assert(value !== undefined && !(value instanceof Uint8Array), 'metadata worker: not a scan page')
  return value
}

function toWire(op: MetaOp): WireOp {
  // An exact copy: cloning a view would copy its whole backing ArrayBuffer.
  return op.type === 'put' ? { type: 'put', key: op.key, value: new Uint8Array(op.value) } : op
}

export class RocksMetaStore implements MetaStore {
  private closing: Promise<void> | undefined

  private constructor(
    private readonly worker: MetaWorkerClient,
    readonly location: string,
  ) {}

  static async open(location: string): Promise<RocksMetaStore> {
    const worker = new MetaWorkerClient()
    try {
      await worker.call({ op: 'open', location })
    } catch (error) {
      await worker.terminate()
      throw new DuplexError(
        'IO_ERROR',
        `cannot open the metadata store ${location}: ${errorMessage(error)}`,
        { cause: error },
      )
    }
    return new RocksMetaStore(worker, location)
  }

  async get(key: string): Promise<Buffer | undefined> {
    assertKey(key)
    let value: MetaValue
    try {
      value = await this.worker.call({ op: 'get', key })
    } catch (error) {
      throw ioError(`read of metadata key ${key}`, error)
    }
    assert(value === undefined || value instanceof Uint8Array, 'metadata worker: not a value')
    return value === undefined ? undefined : asBuffer(value)
  }

  async batch(ops: readonly MetaOp[], options: MetaBatchOptions): Promise<void> {
    if (ops.length === 0) return
    for (const op of ops) assertKey(op.key)
    try {
      await this.worker.call({ op: 'batch', ops: ops.map(toWire), sync: options.sync })
    } catch (error) {
      throw ioError('metadata batch', error)
    }
  }

  async *scan(prefix: string): AsyncIterable<[string, Buffer]> {
    const what = `scan of metadata prefix ${prefix}`
    let page = asScanPage(
      await this.worker
        .call({ op: 'scan', prefix, end: prefixEnd(prefix) })
        .catch((error: unknown) => {
          throw ioError(what, error)
        }),
    )
    try {
      for (;;) {
        for (const [key, value] of page.entries) yield [key, asBuffer(value)]
        if (page.scanId === undefined) return
        const scanId = page.scanId
        page = asScanPage(
          await this.worker.call({ op: 'scanNext', scanId }).catch((error: unknown) => {
            throw ioError(what, error)
          }),
        )
      }
    } finally {
      // Stopped early (or failed): release the worker's iterator.
      const scanId = page.scanId
      if (scanId !== undefined) {
        await this.worker.call({ op: 'scanClose', scanId }).catch(() => undefined)
      }
    }
  }

  /** Closes RocksDB in the worker, then ends the worker. Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.shutdown()
    return this.closing
  }

  private async shutdown(): Promise<void> {
    let failure: unknown
    try {
      await this.worker.call({ op: 'close' })
    } catch (error) {
      // A crashed worker took its database with it: nothing is left to close.
      if (!this.worker.crashed) failure = error
    }
    await this.worker.terminate()
    if (failure !== undefined) throw ioError('close of the metadata store', failure)
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
