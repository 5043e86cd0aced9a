/**
 * Test helper: an in-memory BlockDevice and ExportRegistry for in-process NBD server tests.
 * Data lives in a sparse map of 64 KiB chunks; a chunk that was never written (or was trimmed or
 * zeroed whole) is a hole, and `allocation` reports exactly that, so block-status answers are
 * checkable. An optional `delayMs` hook lets a test make requests finish out of order.
 */
import { DuplexError } from '../../src/core/errors.js'
import type {
  AllocationExtent,
  Attachment,
  BlockDevice,
  ExportInfo,
  ExportRegistry,
  ZeroOptions,
} from '../../src/nbd/exports.js'

export const CHUNK_BYTES = 64 * 1024

export type Op = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'cache' | 'allocation'

export interface MemoryDeviceOptions {
  name?: string
  description?: string
  readOnly?: boolean
  /** Called before each operation; a positive result delays it by that many milliseconds. */
  delayMs?: (op: Op, offset: number, length: number) => number
}

export class MemoryDevice implements BlockDevice {
  readonly info: ExportInfo
  readonly chunks = new Map<number, Buffer>()
  readonly ops: { op: Op; offset: number; length: number }[] = []
  private readonly delayMs: MemoryDeviceOptions['delayMs']

  constructor(sizeBytes: number, options: MemoryDeviceOptions = {}) {
    this.info = {
      name: options.name ?? 'vol',
      description: options.description ?? '',
      sizeBytes,
      readOnly: options.readOnly ?? false,
    }
    this.delayMs = options.delayMs
  }

  async read(offset: number, length: number): Promise<Buffer> {
    await this.begin('read', offset, length)
    const out = Buffer.alloc(length)
    this.forEachChunk(offset, length, (index, at, count, outAt) => {
      this.chunks.get(index)?.copy(out, outAt, at, at + count)
    })
    return out
  }

  async write(offset: number, data: Buffer, _fua: boolean): Promise<void> {
    await this.begin('write', offset, data.length)
    this.forEachChunk(offset, data.length, (index, at, count, dataAt) => {
      let chunk = this.chunks.get(index)
      if (chunk === undefined) {
        chunk = Buffer.alloc(CHUNK_BYTES)
        this.chunks.set(index, chunk)
      }
      data.copy(chunk, at, dataAt, dataAt + count)
    })
  }

  async flush(): Promise<void> {
    await this.begin('flush', 0, 0)
  }

  async trim(offset: number, length: number, _fua: boolean): Promise<void> {
    await this.begin('trim', offset, length)
    this.clear(offset, length)
  }

  async zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    await this.begin('zero', offset, length)
    if (options.fastZero) throw new DuplexError('NOT_SUPPORTED', 'no fast zero in memory')
    this.clear(offset, length)
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.begin('cache', offset, length)
  }

  async allocation(
    offset: number,
    length: number,
    extentsMax: number,
  ): Promise<AllocationExtent[]> {
    await this.begin('allocation', offset, length)
    const extents: AllocationExtent[] = []
    this.forEachChunk(offset, length, (index, _at, count) => {
      const hole = !this.chunks.has(index)
      const last = extents[extents.length - 1]
      if (last !== undefined && last.hole === hole) last.lengthBytes += count
      else extents.push({ lengthBytes: count, hole, zero: hole })
    })
    return extents.slice(0, extentsMax)
  }

  private async begin(op: Op, offset: number, length: number): Promise<void> {
    this.ops.push({ op, offset, length })
    const ms = this.delayMs?.(op, offset, length) ?? 0
    if (ms > 0) await new Promise((resolve) => setTimeout(resolve, ms))
  }

  /** Zeroes a range; chunks it covers whole become holes again. */
  private clear(offset: number, length: number): void {
    this.forEachChunk(offset, length, (index, at, count) => {
      const chunk = this.chunks.get(index)
      if (chunk === undefined) return
      if (count === CHUNK_BYTES) this.chunks.delete(index)
      else chunk.fill(0, at, at + count)
    })
  }

  /** Calls `visit(chunkIndex, offsetInChunk, count, offsetInRange)` for each chunk the range touches. */
  private forEachChunk(
    offset: number,
    length: number,
    visit: (index: number, at: number, count: number, rangeAt: number) => void,
  ): void {
    let done = 0
    while (done < length) {
      const position = offset + done
      const index = Math.floor(position / CHUNK_BYTES)
      const at = position % CHUNK_BYTES
      const count = Math.min(CHUNK_BYTES - at, length - done)
      visit(index, at, count, done)
      done += count
    }
  }
}

/** A registry over a fixed set of devices; counts attachments so tests can see detach. */
export class MemoryRegistry implements ExportRegistry {
  readonly devices = new Map<string, MemoryDevice>()
  attached = 0

  constructor(devices: MemoryDevice[]) {
    for (const device of devices) this.devices.set(device.info.name, device)
  }

  list(): ExportInfo[] {
    return [...this.devices.values()].map((device) => device.info)
  }

  find(name: string): ExportInfo | undefined {
    return this.devices.get(name)?.info
  }

  attach(name: string): Attachment | undefined {
    const device = this.devices.get(name)
    if (device === undefined) return undefined
    this.attached += 1
    let detached = false
    return {
      device,
      detach: () => {
        if (detached) return
        detached = true
        this.attached -= 1
      },
    }
  }
}
