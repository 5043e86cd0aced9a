/**
 * The witness's durable state: its record of every volume (arbiter.ts `VolumeRecord`), one key
 * per volume in RocksDB under `DATA/meta`, written with a synced batch before any grant is
 * answered. `DATA/lock` keeps a second witness off the same directory.
 *
 * Layout: `volume/<name>` -> JSON `{volume, replicas, epoch, owner, inSync}`; `catalog` -> the
 * cluster catalog (catalog.ts) as a protobuf `duplex.v1.Catalog`, rewritten whole on each change
 * (it is small: names, addresses and sizes). A record or catalog that fails its checks on load is
 * STORE_CORRUPT: the witness refuses to start rather than arbitrate from state it cannot trust.
 */
import type { FileHandle } from 'node:fs/promises'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { lockDirectory } from '../core/dir-lock.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import { RocksMetaStore } from '../replica/meta-store.js'
import type { MetaStore } from '../replica/meta-store.js'
import type { VolumeRecord } from './arbiter.js'
import { volumeRecordProblem } from './witness-service.js'
import { decodeCatalog, encodeCatalog } from './admin-service.js'
import { emptyCatalog } from './catalog.js'
import type { Catalog } from './catalog.js'

const volumePrefix = 'volume/'
const catalogKey = 'catalog'

export class WitnessStore {
  private constructor(
    readonly dataDir: string,
    private readonly lock: FileHandle,
    private readonly meta: MetaStore,
  ) {}

  static async open(dataDir: string): Promise<WitnessStore> {
    await mkdir(join(dataDir, 'meta'), { recursive: true })
    const lock = await lockDirectory(dataDir, 'duplex witness')
    try {
      const meta = await RocksMetaStore.open(join(dataDir, 'meta'))
      return new WitnessStore(dataDir, lock, meta)
    } catch (error) {
      await lock.close()
      throw error
    }
  }

  async load(): Promise<VolumeRecord[]> {
    const records: VolumeRecord[] = []
    for await (const [key, value] of this.meta.scan(volumePrefix)) {
      records.push(parseRecord(key, value))
    }
    return records
  }

  async loadCatalog(): Promise<Catalog> {
    const bytes = await this.meta.get(catalogKey)
    if (bytes === undefined) return emptyCatalog
    try {
      return decodeCatalog(bytes)
    } catch (error) {
      throw new DuplexError('STORE_CORRUPT', `witness catalog: ${errorMessage(error)}`)
    }
  }

  /**
   * The catalog after a change, and the records of volumes it no longer holds removed (a volume
   * created again later starts a new history): one synced batch, durable when it resolves.
   */
  async putCatalog(catalog: Catalog, forgetVolumes: readonly string[]): Promise<void> {
    await this.meta.batch(
      [
        { type: 'put', key: catalogKey, value: encodeCatalog(catalog) },
        ...forgetVolumes.map((volume) => ({ type: 'del' as const, key: volumePrefix + volume })),
      ],
      { sync: true },
    )
  }

  /** A volume's record and the catalog together (a replica moved): one synced batch. */
  async putRecordAndCatalog(record: VolumeRecord, catalog: Catalog): Promise<void> {
    await this.meta.batch(
      [
        { type: 'put', key: volumePrefix + record.volume, value: recordBytes(record) },
        { type: 'put', key: catalogKey, value: encodeCatalog(catalog) },
      ],
      { sync: true },
    )
  }

  /** Durable when the promise resolves. */
  async put(record: VolumeRecord): Promise<void> {
    const key = volumePrefix + record.volume
    await this.meta.batch([{ type: 'put', key, value: recordBytes(record) }], { sync: true })
  }

  async close(): Promise<void> {
    try {
      await this.meta.close()
    } finally {
      await this.lock.close()
    }
  }
}

function recordBytes(record: VolumeRecord): Buffer {
  return Buffer.from(JSON.stringify(record))
}

function parseRecord(key: string, value: Buffer): VolumeRecord {
  const corrupt = (why: string): never => {
    throw new DuplexError('STORE_CORRUPT', `witness record ${key}: ${why}`)
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(value.toString())
  } catch (error) {
    return corrupt(`not JSON (${errorMessage(error)})`)
  }
  if (typeof parsed !== 'object' || parsed === null) return corrupt('not an object')
  const fields = parsed as Record<string, unknown>
  const { volume, replicas, epoch, owner, inSync } = fields
  if (
    typeof volume !== 'string' ||
    !Array.isArray(replicas) ||
    replicas.length !== 2 ||
    !replicas.every((name) => typeof name === 'string') ||
    typeof epoch !== 'number' ||
    typeof owner !== 'string' ||
    typeof inSync !== 'boolean'
  ) {
    return corrupt('fields missing or of the wrong type')
  }
  const record: VolumeRecord = {
    volume,
    replicas: [replicas[0] as string, replicas[1] as string],
    epoch,
    owner,
    inSync,
  }
  const problem = volumeRecordProblem(record)
  if (problem !== undefined) corrupt(problem)
  if (key !== volumePrefix + volume) corrupt(`names volume ${volume}`)
  return record
}
