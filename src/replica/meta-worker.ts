/**
 * The worker thread that owns RocksDB for `RocksMetaStore` (see meta-store.ts).
 *
 * Why a worker: `@nxtedition/rocksdb` writes batches synchronously on the calling thread, so a
 * batch with `sync: true` blocks that thread for the WAL fsync (milliseconds). On the main thread
 * that stalls every NBD connection; here it only stalls this thread.
 *
 * Protocol (one MessagePort, the worker's parent port):
 * - request `{ id, op, ... }` (`MetaRequest`), reply `{ id, ok: true, value }` or
 *   `{ id, ok: false, error: { message, code, cause } }` (`MetaReply`; `cause` is the error's own
 *   cause, e.g. RocksDB's "lock hold by current process" under abstract-level's "Database is not
 *   open").
 * - Requests run strictly one after another, in the order posted: an op starts only after the
 *   previous one has completed (its promise settled). Journal batches rely on this order.
 * - Values travel as exact-length Uint8Array copies (structured clone would otherwise copy a
 *   view's whole backing ArrayBuffer, e.g. Buffer's 8 KiB pool slab).
 * - `scan` opens an iterator and returns the first page; `scanNext` returns the following pages;
 *   a page shorter than `scanPageEntries` is the last one and closes the iterator. `scanClose`
 *   ends a scan early.
 *
 * This thread logs nothing: errors go back in replies, and a crash is reported by the main side.
 */
import { parentPort } from 'node:worker_threads'
import { RocksLevel } from '@nxtedition/rocksdb'
import { assert } from '../core/assert.js'

/** Entries per scan reply: one message per page rather than per key. */
export const scanPageEntries = 1000

export type WireOp = { type: 'put'; key: string; value: Uint8Array } | { type: 'del'; key: string }

/** What to do; a request is a call plus its id. */
export type MetaCall =
  | { op: 'open'; location: string }
  | { op: 'get'; key: string }
  | { op: 'batch'; ops: WireOp[]; sync: boolean }
  | { op: 'scan'; prefix: string; end: string }
  | { op: 'scanNext'; scanId: number }
  | { op: 'scanClose'; scanId: number }
  | { op: 'close' }

export type MetaRequest = MetaCall & { id: number }

export type MetaValue = Uint8Array | ScanPage | undefined

/** One page of a scan; `scanId` is undefined when it was the last page. */
export interface ScanPage {
  scanId: number | undefined
  entries: [string, Uint8Array][]
}

export type MetaReply =
  { id: number; ok: true; value: MetaValue } | { id: number; ok: false; error: WireError }

export interface WireError {
  message: string
  code: string | undefined
  cause: WireError | undefined
}

interface Scan {
  entries: AsyncIterator<[string, Buffer]>
  close(): Promise<void>
}

let db: RocksLevel | undefined
const scans = new Map<number, Scan>()
let nextScanId = 1

function openDb(): RocksLevel {
  if (db === undefined) throw new Error('the metadata store is not open')
  return db
}

function exactCopy(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(bytes)
}

async function readPage(scanId: number, scan: Scan): Promise<ScanPage> {
  const entries: [string, Uint8Array][] = []
  while (entries.length < scanPageEntries) {
    const next = await scan.entries.next()
    if (next.done === true) {
      scans.delete(scanId)
      await scan.close()
      return { scanId: undefined, entries }
    }
    const [key, value] = next.value
    entries.push([key, exactCopy(value)])
  }
  return { scanId, entries }
}

async function execute(request: MetaRequest): Promise<MetaValue> {
  switch (request.op) {
    case 'open': {
      assert(db === undefined, 'metadata store opened twice')
      const opening = new RocksLevel(request.location, {
        keyEncoding: 'utf8',
        valueEncoding: 'buffer',
      })
      await opening.open()
      db = opening
      return undefined
    }
    case 'get': {
      try {
        return exactCopy(await openDb().get(request.key))
      } catch (error) {
        if ((error as { code?: unknown }).code === 'LEVEL_NOT_FOUND') return undefined
        throw error
      }
    }
    case 'batch': {
      const ops = request.ops.map((op) =>
        op.type === 'put'
          ? {
              type: 'put' as const,
              key: op.key,
              value: Buffer.from(op.value.buffer, op.value.byteOffset, op.value.byteLength),
            }
          : op,
      )
      await openDb().batch(ops, { sync: request.sync })
      return undefined
    }
    case 'scan': {
      const scanId = nextScanId++
      const iterator = openDb().iterator({ gte: request.prefix, lt: request.end })
      const scan = { entries: iterator[Symbol.asyncIterator](), close: () => iterator.close() }
      scans.set(scanId, scan)
      return await readPage(scanId, scan)
    }
    case 'scanNext': {
      const scan = scans.get(request.scanId)
      assert(scan !== undefined, `no scan ${request.scanId}`)
      return await readPage(request.scanId, scan)
    }
    case 'scanClose': {
      const scan = scans.get(request.scanId)
      scans.delete(request.scanId)
      await scan?.close()
      return undefined
    }
    case 'close': {
      scans.clear() // closing the database closes its iterators
      await db?.close()
      db = undefined
      return undefined
    }
  }
}

/** An error as plain data, with its cause chain (bounded: causes may be circular). */
function toWireError(error: unknown, depth = 0): WireError {
  const message = error instanceof Error ? error.message : String(error)
  const code = (error as { code?: unknown } | null)?.code
  const cause = error instanceof Error && depth < 4 ? error.cause : undefined
  return {
    message,
    code: typeof code === 'string' ? code : undefined,
    cause: cause === undefined ? undefined : toWireError(cause, depth + 1),
  }
}

function errorReply(id: number, error: unknown): MetaReply {
  return { id, ok: false, error: toWireError(error) }
}

async function serve(request: MetaRequest): Promise<MetaReply> {
  try {
    return { id: request.id, ok: true, value: await execute(request) }
  } catch (error) {
    return errorReply(request.id, error)
  }
}

const port = parentPort
assert(port !== null, 'meta-worker.js must run as a worker thread')

/** The last request's completion: each request waits for it, so requests run in order. */
let tail: Promise<void> = Promise.resolve()

port.on('message', (request: MetaRequest) => {
  tail = tail.then(async () => {
    port.postMessage(await serve(request))
  })
})
