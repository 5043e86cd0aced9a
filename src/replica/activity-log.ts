/**
 * The persisted activity log of one volume replica: which extents (4 MiB by default) are hot,
 * i.e. may differ between the two replicas after a crash. The primary's core decides what to
 * heat and cool (replication.ts); this module only stores its decisions, one key per hot extent,
 * `al/<volume-id>/<extent, 8 hex digits>`, with a synced batch so an extent is durably hot
 * before any write lands in it. Resync (issue 4) reads the hot set of both replicas.
 */
import { assertSafeUint } from '../core/assert.js'
import type { MetaOp, MetaStore } from './meta-store.js'

const empty = Buffer.alloc(0)

export function activityLogPrefix(volumeId: string): string {
  return `al/${volumeId}/`
}

export class ActivityLog {
  constructor(
    private readonly meta: MetaStore,
    private readonly volumeId: string,
  ) {}

  /** The extents persisted as hot (after a crash: the ones that may differ). */
  async hotExtents(): Promise<number[]> {
    const extents: number[] = []
    const prefix = activityLogPrefix(this.volumeId)
    for await (const [key] of this.meta.scan(prefix)) {
      const extent = Number.parseInt(key.slice(prefix.length), 16)
      if (Number.isSafeInteger(extent)) extents.push(extent)
    }
    return extents
  }

  /** One synced transaction: `hot` become hot, `cold` become cold. */
  async persist(hot: readonly number[], cold: readonly number[]): Promise<void> {
    const ops: MetaOp[] = []
    for (const extent of hot) ops.push({ type: 'put', key: this.key(extent), value: empty })
    for (const extent of cold) ops.push({ type: 'del', key: this.key(extent) })
    if (ops.length > 0) await this.meta.batch(ops, { sync: true })
  }

  /** Cools every extent (the replicas were just made identical there). */
  async clear(): Promise<void> {
    await this.persist([], await this.hotExtents())
  }

  private key(extent: number): string {
    assertSafeUint(extent, 'extent')
    return activityLogPrefix(this.volumeId) + extent.toString(16).padStart(8, '0')
  }
}
