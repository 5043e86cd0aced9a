/**
 * The node's local volume store: owns the data directory and is the `ExportRegistry` the NBD
 * server serves from.
 *
 * Layout:
 *   DATA/lock               held (OFD lock, `tryLock`) for the store's lifetime: one process only
 *   DATA/meta/              RocksDB: `volume/<name>` -> VolumeRecord JSON, `alloc/<id>/<segment>`,
 *                           `replica/<name>` -> ReplicaRecord JSON (replicated volumes only)
 *                           `dirty/<name>` -> dirty bitmap of a degraded volume (dirty-map.ts)
 *   DATA/volumes/<id>.data  one sparse file per volume, as long as the volume
 *
 * Crash safety of the admin operations (each step durable before the next):
 * - create: data file created, truncated to size, fsynced (file and directory), THEN the record
 *   is written synced. A crash in between leaves an orphan data file, deleted at the next open.
 * - delete: record and allocation keys removed in one synced batch, THEN the file is unlinked.
 *   A crash in between again leaves an orphan file.
 * So a record without its data file, or a data file of the wrong length, is damage from outside
 * and `open` reports STORE_CORRUPT instead of guessing.
 *
 * Admin operations (create, delete, close) run one at a time; attach/detach are synchronous.
 */
import { randomBytes } from 'node:crypto'
import { constants } from 'node:fs'
import { mkdir, open, readdir, unlink } from 'node:fs/promises'
import type { FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import { lockDirectory } from '../core/dir-lock.js'
import { assert } from '../core/assert.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { Attachment, ExportInfo, ExportRegistry } from '../nbd/exports.js'
import { ActivityLog, activityLogPrefix } from './activity-log.js'
import { AllocationMap, allocationChunkBytesDefault } from './allocation-map.js'
import { DirtyMap } from './dirty-map.js'
import type { MetaOp, MetaStore } from './meta-store.js'
import { RocksMetaStore } from './meta-store.js'
import { allocationKeyPrefix, parseAllocationSegment, Volume } from './volume.js'
import type { VolumeRecord } from './volume.js'

export const volumeNameBytesMax = 64
export const volumeSizeBytesMax = 2 ** 50
export const volumeSizeAlignBytes = 4096

const volumeNamePattern = /^[a-z0-9][a-z0-9._-]*$/
const volumeIdPattern = /^[0-9a-f]{16}$/
const dataFilePattern = /^([0-9a-f]{16})\.data$/
const volumeKeyPrefix = 'volume/'
const replicaKeyPrefix = 'replica/'
const dirtyKeyPrefix = 'dirty/'

/**
 * The replication role of this node's replica, persisted (synced) before it takes effect:
 * `epoch` 0 means "never joined a replication pair" (a replica just created here).
 */
export interface ReplicaRecord {
  /** The newest epoch this replica knows; a primary start or a handover moves it up. */
  epoch: number
  /** The node that is primary in `epoch` ('' while epoch is 0). */
  primary: string
  /**
   * Inconsistent until a full initial sync from the primary completed; Outdated when it missed
   * writes while its peer ran alone (a resync of the dirty regions makes it UpToDate again).
   */
  state: 'UpToDate' | 'Inconsistent' | 'Outdated'
  /**
   * The generations this replica entered (epochs.ts), newest last, at most
   * `generationHistoryMax`: who owned each, and whether an admin forced it. Two replicas whose
   * histories name different owners for one generation have forked (split brain).
   */
  history?: GenerationEntry[]
}

export interface GenerationEntry {
  generation: number
  owner: string
  forced: boolean
}

export const generationHistoryMax = 32

export interface NodeStoreOptions {
  /** Allocation chunk size; the default (64 KiB) is what production uses. */
  chunkBytes?: number
}

/** What `open` found and repaired, for the log. */
export interface OpenReport {
  /** Data files with no record (a create or delete interrupted by a crash), now deleted. */
  orphanFilesRemoved: string[]
  /** Allocation keys of volumes with no record, now deleted. */
  orphanAllocationKeysRemoved: number
}

/** An export as the registry lists it, plus what admins want to see. */
export interface VolumeListing extends ExportInfo {
  id: string
  createdAtMs: number
  /** NBD clients attached now. */
  attachedClients: number
}

interface Entry {
  volume: Volume
  attachments: number
  replica: ReplicaRecord | undefined
}

/** Throws INVALID_ARGUMENT unless `name` is a valid volume name. */
export function validateVolumeName(name: string): void {
  if (name.length < 1 || name.length > volumeNameBytesMax || !volumeNamePattern.test(name)) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `volume name ${JSON.stringify(name)} is not valid: use 1-${volumeNameBytesMax} characters ` +
        `from a-z, 0-9, '.', '_' and '-', starting with a letter or a digit`,
    )
  }
}

/** Throws INVALID_ARGUMENT unless `sizeBytes` is a valid volume size. */
export function validateVolumeSize(sizeBytes: number): void {
  if (
    !Number.isSafeInteger(sizeBytes) ||
    sizeBytes <= 0 ||
    sizeBytes % volumeSizeAlignBytes !== 0 ||
    sizeBytes > volumeSizeBytesMax
  ) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `volume size ${sizeBytes} is not valid: size must be a multiple of 4 KiB, ` +
        `greater than zero and at most 1 PiB (2^50 bytes)`,
    )
  }
}

export class NodeStore implements ExportRegistry {
  private readonly entries = new Map<string, Entry>()
  /** Serializes create, delete and close. */
  private adminTail: Promise<unknown> = Promise.resolve()
  private closed = false

  private constructor(
    readonly dataDir: string,
    private readonly lockHandle: FileHandle,
    private readonly meta: MetaStore,
    private readonly chunkBytes: number | undefined,
    readonly openReport: OpenReport,
  ) {}

  /** Locks and opens DATA (created if missing), loads every volume, removes crash leftovers. */
  static async open(dataDir: string, options: NodeStoreOptions = {}): Promise<NodeStore> {
    await mkdir(join(dataDir, 'volumes'), { recursive: true })
    await mkdir(join(dataDir, 'meta'), { recursive: true })
    const lockHandle = await lockDirectory(dataDir, 'duplex node')
    let meta: MetaStore | undefined
    try {
      meta = await RocksMetaStore.open(join(dataDir, 'meta'))
      const report: OpenReport = { orphanFilesRemoved: [], orphanAllocationKeysRemoved: 0 }
      const store = new NodeStore(dataDir, lockHandle, meta, options.chunkBytes, report)
      await store.load()
      return store
    } catch (error) {
      await meta?.close()
      await lockHandle.close() // closing the descriptor drops the lock
      throw error
    }
  }

  // ExportRegistry

  /** Every volume, by name. */
  list(): VolumeListing[] {
    return [...this.entries.values()]
      .map(({ volume, attachments }) => ({
        ...volume.info,
        id: volume.record.id,
        createdAtMs: volume.record.createdAtMs,
        attachedClients: attachments,
      }))
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
  }

  find(name: string): ExportInfo | undefined {
    return this.entries.get(name)?.volume.info
  }

  attach(name: string): Attachment | undefined {
    const entry = this.entries.get(name)
    if (entry === undefined || this.closed) return undefined
    entry.attachments += 1
    let attached = true
    return {
      device: entry.volume,
      detach: () => {
        if (!attached) return
        attached = false
        entry.attachments -= 1
        assert(entry.attachments >= 0, 'attachments went negative')
      },
    }
  }

  // Volumes

  /** The activity log of a volume (replication persists its hot extents there). */
  activityLog(name: string): ActivityLog | undefined {
    const volume = this.get(name)
    return volume === undefined ? undefined : new ActivityLog(this.meta, volume.id)
  }

  get(name: string): Volume | undefined {
    return this.entries.get(name)?.volume
  }

  /** The persisted replication role of a volume, or undefined if it was never replicated. */
  replica(name: string): ReplicaRecord | undefined {
    const replica = this.entries.get(name)?.replica
    return replica === undefined ? undefined : { ...replica }
  }

  /** Persists (synced) the replication role of a volume; effective once this resolves. */
  setReplica(name: string, replica: ReplicaRecord): Promise<void> {
    return this.admin(async () => {
      const entry = this.entries.get(name)
      if (entry === undefined) {
        throw new DuplexError('VOLUME_NOT_FOUND', `volume ${name} does not exist`)
      }
      const value = Buffer.from(JSON.stringify(checkedReplica(replica, 'new replica record')))
      await this.meta.batch([{ type: 'put', key: replicaKey(name), value }], { sync: true })
      entry.replica = { ...replica }
    })
  }

  /** The persisted dirty bitmap of a volume (undefined: none, i.e. nothing is dirty). */
  async dirtyBits(name: string): Promise<Buffer | undefined> {
    return this.meta.get(dirtyKey(name))
  }

  /** Persists a volume's dirty bitmap (an empty one deletes it); `sync` makes it durable first. */
  async setDirtyBits(name: string, bits: Uint8Array, sync: boolean): Promise<void> {
    if (!this.entries.has(name)) {
      throw new DuplexError('VOLUME_NOT_FOUND', `volume ${name} does not exist`)
    }
    const empty = bits.every((byte) => byte === 0)
    const op: MetaOp = empty
      ? { type: 'del', key: dirtyKey(name) }
      : { type: 'put', key: dirtyKey(name), value: Buffer.from(bits) }
    await this.meta.batch([op], { sync })
  }

  attachmentCount(name: string): number {
    return this.entries.get(name)?.attachments ?? 0
  }

  async create(name: string, sizeBytes: number): Promise<VolumeRecord> {
    validateVolumeName(name)
    validateVolumeSize(sizeBytes)
    return await this.admin(async () => {
      if (this.entries.has(name)) {
        throw new DuplexError('VOLUME_EXISTS', `volume ${name} already exists`)
      }
      const record: VolumeRecord = {
        id: randomBytes(8).toString('hex'),
        name,
        sizeBytes,
        createdAtMs: Date.now(),
        allocationChunkBytes: this.chunkBytes ?? allocationChunkBytesDefault,
      }
      const path = this.dataPath(record.id)
      const handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL)
      try {
        await handle.truncate(sizeBytes)
        await handle.sync()
        await this.syncVolumesDir()
        await this.meta.batch(
          [{ type: 'put', key: volumeKey(name), value: Buffer.from(JSON.stringify(record)) }],
          { sync: true },
        )
      } catch (error) {
        await handle.close()
        await unlink(path).catch(() => undefined) // else an orphan, removed at the next open
        throw asStoreError(`cannot create volume ${name}`, error)
      }
      const map = new AllocationMap(mapOptions(record))
      this.entries.set(name, {
        volume: new Volume(record, handle, this.meta, map),
        attachments: 0,
        replica: undefined,
      })
      return { ...record }
    })
  }

  /**
   * Grows a volume to `sizeBytes`; the new bytes read as zeros. Only while no client is attached
   * (VOLUME_BUSY otherwise: a client sized its view at its handshake). Crash-safe: the file grows
   * first, then the record (with the dirty bitmap, if any, widened) in one synced batch; a file
   * found longer than its record at open was a grow that did not finish and is cut back.
   */
  grow(name: string, sizeBytes: number): Promise<void> {
    return this.admin(async () => {
      const entry = this.entries.get(name)
      if (entry === undefined) {
        throw new DuplexError('VOLUME_NOT_FOUND', `volume ${name} does not exist`)
      }
      validateVolumeSize(sizeBytes)
      const { record } = entry.volume
      if (sizeBytes === record.sizeBytes) return
      if (sizeBytes < record.sizeBytes) {
        throw new DuplexError(
          'INVALID_ARGUMENT',
          `volume ${name} is ${record.sizeBytes} bytes; volumes only grow (asked for ${sizeBytes})`,
        )
      }
      if (entry.attachments > 0) {
        throw new DuplexError(
          'VOLUME_BUSY',
          `volume ${name} cannot grow while ${entry.attachments} client(s) are attached`,
        )
      }
      const grown: VolumeRecord = { ...record, sizeBytes }
      await entry.volume.close()
      const path = this.dataPath(record.id)
      try {
        const handle = await open(path, 'r+')
        try {
          await handle.truncate(sizeBytes)
          await handle.sync()
        } finally {
          await handle.close()
        }
        const ops: MetaOp[] = [
          { type: 'put', key: volumeKey(name), value: Buffer.from(JSON.stringify(grown)) },
        ]
        const bits = await this.meta.get(dirtyKey(name))
        if (bits !== undefined) {
          const wider = Buffer.alloc(DirtyMap.bitsLength(sizeBytes))
          bits.copy(wider)
          ops.push({ type: 'put', key: dirtyKey(name), value: wider })
        }
        await this.meta.batch(ops, { sync: true })
        entry.volume = await this.loadVolume(grown)
      } catch (error) {
        // Back to the old size (the record still says so); the volume stays served.
        entry.volume = await this.loadVolume(record)
        throw asStoreError(`cannot grow volume ${name}`, error)
      }
    })
  }

  /** Deletes a volume and its data. VOLUME_BUSY while clients are attached. */
  delete(name: string): Promise<void> {
    return this.admin(async () => {
      const entry = this.entries.get(name)
      if (entry === undefined) {
        throw new DuplexError('VOLUME_NOT_FOUND', `volume ${name} does not exist`)
      }
      if (entry.attachments > 0) {
        const clients = entry.attachments === 1 ? '1 client is' : `${entry.attachments} clients are`
        throw new DuplexError(
          'VOLUME_BUSY',
          `volume ${name} cannot be deleted: ${clients} attached; disconnect them first`,
        )
      }
      this.entries.delete(name) // from here on no client can attach
      const { id } = entry.volume.record
      await entry.volume.close()
      const ops: MetaOp[] = [
        { type: 'del', key: volumeKey(name) },
        { type: 'del', key: replicaKey(name) },
        { type: 'del', key: dirtyKey(name) },
      ]
      for (const prefix of [allocationKeyPrefix(id), activityLogPrefix(id)]) {
        for await (const [key] of this.meta.scan(prefix)) ops.push({ type: 'del', key })
      }
      await this.meta.batch(ops, { sync: true })
      await unlink(this.dataPath(id))
      await this.syncVolumesDir()
    })
  }

  /** Closes every volume (waiting for their ops), the metadata store, and drops the lock. */
  close(): Promise<void> {
    return this.admin(async () => {
      if (this.closed) return
      this.closed = true
      const volumes = [...this.entries.values()].map((entry) => entry.volume)
      this.entries.clear()
      const results = await Promise.allSettled(volumes.map((volume) => volume.close()))
      await this.meta.close()
      await this.lockHandle.close()
      const failed = results.find((result) => result.status === 'rejected')
      if (failed) throw asStoreError('cannot close every volume cleanly', failed.reason)
    })
  }

  private admin<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.adminTail.then(() => {
      if (this.closed) throw new DuplexError('SHUTTING_DOWN', `store ${this.dataDir} is closed`)
      return fn()
    })
    // A failed operation must not stop the ones queued after it.
    this.adminTail = run.catch(() => undefined)
    return run
  }

  private async load(): Promise<void> {
    const records: VolumeRecord[] = []
    for await (const [key, value] of this.meta.scan(volumeKeyPrefix)) {
      records.push(parseRecord(key, value))
    }
    const replicas = new Map<string, ReplicaRecord>()
    for await (const [key, value] of this.meta.scan(replicaKeyPrefix)) {
      replicas.set(key.slice(replicaKeyPrefix.length), parseReplica(key, value))
    }
    const ids = new Set(records.map((record) => record.id))
    await this.removeOrphanFiles(ids)
    await this.removeOrphanAllocation(ids)
    try {
      for (const record of records) {
        const volume = await this.loadVolume(record)
        this.entries.set(record.name, {
          volume,
          attachments: 0,
          replica: replicas.get(record.name),
        })
      }
    } catch (error) {
      await Promise.allSettled([...this.entries.values()].map((entry) => entry.volume.close()))
      this.entries.clear()
      throw error
    }
  }

  private async loadVolume(record: VolumeRecord): Promise<Volume> {
    const path = this.dataPath(record.id)
    let handle: FileHandle
    try {
      handle = await open(path, 'r+')
    } catch (error) {
      if ((error as { code?: unknown }).code === 'ENOENT') {
        throw new DuplexError(
          'STORE_CORRUPT',
          `volume ${record.name} (id ${record.id}): its data file ${path} is missing; ` +
            `restore the file or delete the volume record`,
        )
      }
      throw asStoreError(`cannot open the data file of volume ${record.name}`, error)
    }
    try {
      let { size } = await handle.stat()
      if (size > record.sizeBytes) {
        // A grow that stopped before its record was written: nothing was written past the old
        // end (no client saw it), so cutting the file back loses nothing.
        await handle.truncate(record.sizeBytes)
        size = record.sizeBytes
      }
      if (size !== record.sizeBytes) {
        throw new DuplexError(
          'STORE_CORRUPT',
          `volume ${record.name} (id ${record.id}): data file ${path} is ${size} bytes, ` +
            `the volume is ${record.sizeBytes}`,
        )
      }
      const map = new AllocationMap(mapOptions(record))
      for await (const [key, value] of this.meta.scan(allocationKeyPrefix(record.id))) {
        const segment = parseAllocationSegment(key, record.id)
        if (segment === undefined) {
          throw new DuplexError('STORE_CORRUPT', `unexpected metadata key ${key}`)
        }
        map.loadSegment(segment, value)
      }
      return new Volume(record, handle, this.meta, map)
    } catch (error) {
      await handle.close()
      throw error
    }
  }

  private async removeOrphanFiles(ids: Set<string>): Promise<void> {
    const volumesDir = join(this.dataDir, 'volumes')
    let removed = false
    for (const file of await readdir(volumesDir)) {
      const id = dataFilePattern.exec(file)?.[1]
      if (id === undefined || ids.has(id)) continue
      await unlink(join(volumesDir, file))
      this.openReport.orphanFilesRemoved.push(file)
      removed = true
    }
    if (removed) await this.syncVolumesDir()
  }

  private async removeOrphanAllocation(ids: Set<string>): Promise<void> {
    const ops: MetaOp[] = []
    for await (const [key] of this.meta.scan('alloc/')) {
      const id = key.split('/')[1] ?? ''
      if (!ids.has(id)) ops.push({ type: 'del', key })
    }
    await this.meta.batch(ops, { sync: true })
    this.openReport.orphanAllocationKeysRemoved = ops.length
  }

  private dataPath(id: string): string {
    assert(volumeIdPattern.test(id), `volume id ${id}`)
    return join(this.dataDir, 'volumes', `${id}.data`)
  }

  private async syncVolumesDir(): Promise<void> {
    const dir = await open(join(this.dataDir, 'volumes'), 'r')
    try {
      await dir.sync()
    } finally {
      await dir.close()
    }
  }
}

function volumeKey(name: string): string {
  return volumeKeyPrefix + name
}

function replicaKey(name: string): string {
  return replicaKeyPrefix + name
}

function dirtyKey(name: string): string {
  return dirtyKeyPrefix + name
}

function parseReplica(key: string, value: Buffer): ReplicaRecord {
  let parsed: unknown
  try {
    parsed = JSON.parse(value.toString('utf8'))
  } catch (error) {
    throw new DuplexError(
      'STORE_CORRUPT',
      `replica record ${key} is damaged: ${errorMessage(error)}`,
    )
  }
  return checkedReplica(parsed, `replica record ${key}`)
}

function checkedReplica(value: unknown, what: string): ReplicaRecord {
  const fail = (why: string): DuplexError =>
    new DuplexError('STORE_CORRUPT', `${what} is damaged: ${why}`)
  if (typeof value !== 'object' || value === null) throw fail('not an object')
  const { epoch, primary, state } = value as Record<string, unknown>
  if (typeof epoch !== 'number' || !Number.isSafeInteger(epoch) || epoch < 0) throw fail('epoch')
  if (typeof primary !== 'string' || epoch > 0 !== primary.length > 0) throw fail('primary')
  if (state !== 'UpToDate' && state !== 'Inconsistent' && state !== 'Outdated') {
    throw fail('state')
  }
  const history = (value as Record<string, unknown>)['history']
  if (history === undefined) return { epoch, primary, state }
  if (!Array.isArray(history) || history.length > generationHistoryMax) throw fail('history')
  const entries = history.map((entry: unknown): GenerationEntry => {
    if (typeof entry !== 'object' || entry === null) throw fail('history entry')
    const { generation, owner, forced } = entry as Record<string, unknown>
    if (typeof generation !== 'number' || !Number.isSafeInteger(generation) || generation < 0) {
      throw fail('history generation')
    }
    if (typeof owner !== 'string' || owner.length === 0) throw fail('history owner')
    if (typeof forced !== 'boolean') throw fail('history forced')
    return { generation, owner, forced }
  })
  return { epoch, primary, state, history: entries }
}

function parseRecord(key: string, value: Buffer): VolumeRecord {
  const fail = (why: string): DuplexError =>
    new DuplexError('STORE_CORRUPT', `volume record ${key} is damaged: ${why}`)
  let parsed: unknown
  try {
    parsed = JSON.parse(value.toString('utf8'))
  } catch (error) {
    throw fail(errorMessage(error))
  }
  if (typeof parsed !== 'object' || parsed === null) throw fail('not an object')
  const { id, name, sizeBytes, createdAtMs, allocationChunkBytes } = parsed as Record<
    string,
    unknown
  >
  if (typeof id !== 'string' || !volumeIdPattern.test(id)) throw fail('bad id')
  if (typeof name !== 'string' || volumeKey(name) !== key) throw fail('name differs from key')
  if (typeof sizeBytes !== 'number' || typeof createdAtMs !== 'number') throw fail('bad numbers')
  try {
    validateVolumeName(name)
    validateVolumeSize(sizeBytes)
  } catch (error) {
    throw fail(errorMessage(error))
  }
  // Records written before the chunk size was recorded used the original 64 KiB.
  const chunkBytes = allocationChunkBytes ?? legacyAllocationChunkBytes
  if (typeof chunkBytes !== 'number' || !isChunkSize(chunkBytes)) throw fail('bad chunk size')
  return { id, name, sizeBytes, createdAtMs, allocationChunkBytes: chunkBytes }
}

const legacyAllocationChunkBytes = 64 * 1024

function isChunkSize(bytes: number): boolean {
  return Number.isSafeInteger(bytes) && bytes >= 4096 && (bytes & (bytes - 1)) === 0
}

function mapOptions(record: VolumeRecord): { sizeBytes: number; chunkBytes: number } {
  return { sizeBytes: record.sizeBytes, chunkBytes: record.allocationChunkBytes }
}

function asStoreError(what: string, error: unknown): DuplexError {
  if (error instanceof DuplexError) return error
  const code = (error as { code?: unknown }).code
  return new DuplexError(
    code === 'ENOSPC' ? 'NO_SPACE' : 'IO_ERROR',
    `${what}: ${errorMessage(error)}`,
    { cause: error },
  )
}
