/**
 * What the NBD server needs from storage: a registry of exports and, per attached client, a
 * block device. Requests reaching a BlockDevice are already validated (in range, flags allowed),
 * so implementations only move bytes. Operational failures are thrown as DuplexError; the server
 * turns their codes into errnos.
 */

export interface ExportInfo {
  name: string
  description: string
  sizeBytes: number
  readOnly: boolean
}

/** One run of the allocation map: `hole` means unallocated, `zero` means it reads as zeros. */
export interface AllocationExtent {
  lengthBytes: number
  hole: boolean
  zero: boolean
}

export interface ZeroOptions {
  fua: boolean
  /** The client forbids punching a hole: the range must stay allocated. */
  noHole: boolean
  /** The client wants a fast failure (NOT_SUPPORTED) rather than a slow zeroing. */
  fastZero: boolean
}

export interface BlockDevice {
  readonly info: ExportInfo
  read(offset: number, length: number): Promise<Buffer>
  write(offset: number, data: Buffer, fua: boolean): Promise<void>
  /** Makes every write completed before the call durable. */
  flush(): Promise<void>
  trim(offset: number, length: number, fua: boolean): Promise<void>
  zero(offset: number, length: number, options: ZeroOptions): Promise<void>
  /** A hint to warm caches; may do nothing. */
  cache(offset: number, length: number): Promise<void>
  /**
   * Allocation of [offset, offset + length) as consecutive extents covering at most that range,
   * at most `extentsMax` of them. Must never report a hole or zeros over non-zero data.
   */
  allocation(offset: number, length: number, extentsMax: number): Promise<AllocationExtent[]>
}

export interface Attachment {
  readonly device: BlockDevice
  /** The client is gone; the export may now be deleted. Idempotent. */
  detach(): void
}

export interface ExportRegistry {
  list(): ExportInfo[]
  find(name: string): ExportInfo | undefined
  /** Why this client may not open the export (its access list), or undefined if it may. */
  refuse?(
    name: string,
    client: { address: string; certificateName: string | undefined },
  ): string | undefined
  /** Opens the export for one client connection, or undefined if there is no such export. */
  attach(name: string): Attachment | undefined
}
