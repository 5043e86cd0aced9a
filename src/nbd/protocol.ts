/**
 * NBD wire format: constants, encoders and decoders, and the one place where transmission
 * requests are validated (nbdkit's rule: check every request once at the edge so the backend only
 * moves bytes). Pure: no sockets, files or clocks. The reference is doc/proto.md in
 * NetworkBlockDevice/nbd; names follow it with the NBD_ prefix dropped.
 *
 * Offsets arrive as 64-bit unsigned integers. They stay `bigint` until validation has checked
 * them against the export size, and become safe JS integers only after that check.
 */

export const NBDMAGIC = 0x4e42444d41474943n
export const IHAVEOPT = 0x49484156454f5054n
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n
export const REQUEST_MAGIC = 0x25609513
export const SIMPLE_REPLY_MAGIC = 0x67446698
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef

export const HandshakeFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const
export const ClientFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const

const REP_ERR = 0x80000000
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
} as const

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const

export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const

export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const

export const ReplyFlag = { DONE: 1 } as const

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const

/** Errno values on the wire (they are Linux's, fixed by the protocol whatever the platform). */
export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const
export type Errno = (typeof Errno)[keyof typeof Errno]

export const BASE_ALLOCATION = 'base:allocation'
/** The context id we hand out for base:allocation; any fixed non-zero value works. */
export const BASE_ALLOCATION_ID = 1
export const StateFlag = { HOLE: 1, ZERO: 2 } as const

export const OPTION_HEADER_BYTES = 16
export const REQUEST_HEADER_BYTES = 28
/** Option payloads longer than this are hostile: names are capped at 4 KiB by the spec. */
export const OPTION_DATA_BYTES_MAX = 64 * 1024
/** Largest READ or WRITE payload we accept; advertised as the maximum block size. */
export const PAYLOAD_BYTES_MAX = 32 * 1024 * 1024
/** Largest string the spec allows for names and descriptions. */
export const STRING_BYTES_MAX = 4096

// ---------------------------------------------------------------------------------------------
// Handshake encoding

export function encodeServerGreeting(): Buffer {
  const buf = Buffer.alloc(18)
  buf.writeBigUInt64BE(NBDMAGIC, 0)
  buf.writeBigUInt64BE(IHAVEOPT, 8)
  buf.writeUInt16BE(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 16)
  return buf
}

export function encodeOptionReply(option: number, replyType: number, data?: Buffer): Buffer {
  const payload = data ?? Buffer.alloc(0)
  const buf = Buffer.alloc(20 + payload.length)
  buf.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0)
  buf.writeUInt32BE(option >>> 0, 8)
  buf.writeUInt32BE(replyType >>> 0, 12)
  buf.writeUInt32BE(payload.length, 16)
  payload.copy(buf, 20)
  return buf
}

/** An error reply with a human-readable message, which clients such as nbdinfo print. */
export function encodeOptionError(option: number, replyType: number, message: string): Buffer {
  return encodeOptionReply(option, replyType, Buffer.from(message, 'utf8'))
}

export function encodeInfoExport(sizeBytes: number, flags: number): Buffer {
  const buf = Buffer.alloc(12)
  buf.writeUInt16BE(Info.EXPORT, 0)
  buf.writeBigUInt64BE(BigInt(sizeBytes), 2)
  buf.writeUInt16BE(flags, 10)
  return buf
}

export function encodeInfoString(type: number, text: string): Buffer {
  const body = Buffer.from(text, 'utf8')
  const buf = Buffer.alloc(2 + body.length)
  buf.writeUInt16BE(type, 0)
  body.copy(buf, 2)
  return buf
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const buf = Buffer.alloc(14)
  buf.writeUInt16BE(Info.BLOCK_SIZE, 0)
  buf.writeUInt32BE(min, 2)
  buf.writeUInt32BE(preferred, 6)
  buf.writeUInt32BE(max, 10)
  return buf
}

/** The reply to NBD_OPT_LIST: one per export. */
export function encodeServerEntry(name: string): Buffer {
  const body = Buffer.from(name, 'utf8')
  const buf = Buffer.alloc(4 + body.length)
  buf.writeUInt32BE(body.length, 0)
  body.copy(buf, 4)
  return buf
}

export function encodeMetaContext(id: number, name: string): Buffer {
  const body = Buffer.from(name, 'utf8')
  const buf = Buffer.alloc(4 + body.length)
  buf.writeUInt32BE(id, 0)
  body.copy(buf, 4)
  return buf
}

/** The reply to the old-style NBD_OPT_EXPORT_NAME, which ends option haggling. */
export function encodeExportNameReply(sizeBytes: number, flags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(noZeroes ? 10 : 134)
  buf.writeBigUInt64BE(BigInt(sizeBytes), 0)
  buf.writeUInt16BE(flags, 8)
  return buf
}

// ---------------------------------------------------------------------------------------------
// Handshake decoding

export interface OptionHeader {
  magic: bigint
  option: number
  length: number
}

export function decodeOptionHeader(buf: Buffer): OptionHeader {
  return {
    magic: buf.readBigUInt64BE(0),
    option: buf.readUInt32BE(8),
    length: buf.readUInt32BE(12),
  }
}

/** A cursor that never reads past the end: every read says whether it fit. */
class Reader {
  private offset = 0
  constructor(private readonly buf: Buffer) {}
  get remaining(): number {
    return this.buf.length - this.offset
  }
  u16(): number | undefined {
    if (this.remaining < 2) return undefined
    const value = this.buf.readUInt16BE(this.offset)
    this.offset += 2
    return value
  }
  u32(): number | undefined {
    if (this.remaining < 4) return undefined
    const value = this.buf.readUInt32BE(this.offset)
    this.offset += 4
    return value
  }
  string(length: number): string | undefined {
    if (length > this.remaining) return undefined
    const text = this.buf.toString('utf8', this.offset, this.offset + length)
    this.offset += length
    return text
  }
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; message: string }

function fail<T>(message: string): Decoded<T> {
  return { ok: false, message }
}

/** NBD_OPT_INFO and NBD_OPT_GO: export name, then a list of requested info types. */
export function decodeInfoRequest(data: Buffer): Decoded<{ name: string; infos: number[] }> {
  const r = new Reader(data)
  const nameLength = r.u32()
  if (nameLength === undefined) return fail('option too short for the export name length')
  if (nameLength > STRING_BYTES_MAX) return fail('export name longer than 4096 bytes')
  const name = r.string(nameLength)
  if (name === undefined) return fail('export name runs past the end of the option')
  const count = r.u16()
  if (count === undefined) return fail('option too short for the number of info requests')
  if (r.remaining !== count * 2) {
    return fail(`option announces ${count} info requests but carries ${r.remaining} bytes`)
  }
  const infos: number[] = []
  for (let i = 0; i < count; i++) infos.push(r.u16() ?? 0)
  return { ok: true, value: { name, infos } }
}

/** NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: export name and queries. */
export function decodeMetaContextRequest(
  data: Buffer,
): Decoded<{ name: string; queries: string[] }> {
  const r = new Reader(data)
  const nameLength = r.u32()
  if (nameLength === undefined) return fail('option too short for the export name length')
  if (nameLength > STRING_BYTES_MAX) return fail('export name longer than 4096 bytes')
  const name = r.string(nameLength)
  if (name === undefined) return fail('export name runs past the end of the option')
  const count = r.u32()
  if (count === undefined) return fail('option too short for the number of queries')
  const queries: string[] = []
  for (let i = 0; i < count; i++) {
    const length = r.u32()
    if (length === undefined) return fail(`query ${i} has no length`)
    if (length > STRING_BYTES_MAX) return fail(`query ${i} longer than 4096 bytes`)
    const query = r.string(length)
    if (query === undefined) return fail(`query ${i} runs past the end of the option`)
    queries.push(query)
  }
  if (r.remaining !== 0) return fail(`${r.remaining} stray bytes after the last query`)
  return { ok: true, value: { name, queries } }
}

/** Which of our contexts a meta-context query selects (we have exactly one: base:allocation). */
export function metaContextMatches(query: string): boolean {
  return query === BASE_ALLOCATION || query === 'base:'
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests

export interface RequestHeader {
  magic: number
  flags: number
  type: number
  cookie: bigint
  offset: bigint
  length: number
}

export function decodeRequestHeader(buf: Buffer, at = 0): RequestHeader {
  return {
    magic: buf.readUInt32BE(at),
    flags: buf.readUInt16BE(at + 4),
    type: buf.readUInt16BE(at + 6),
    cookie: buf.readBigUInt64BE(at + 8),
    offset: buf.readBigUInt64BE(at + 16),
    length: buf.readUInt32BE(at + 24),
  }
}

export function encodeRequestHeader(header: Omit<RequestHeader, 'magic'>): Buffer {
  const buf = Buffer.alloc(REQUEST_HEADER_BYTES)
  buf.writeUInt32BE(REQUEST_MAGIC, 0)
  buf.writeUInt16BE(header.flags, 4)
  buf.writeUInt16BE(header.type, 6)
  buf.writeBigUInt64BE(header.cookie, 8)
  buf.writeBigUInt64BE(header.offset, 16)
  buf.writeUInt32BE(header.length, 24)
  return buf
}

/** A validated request: offsets and lengths are safe integers inside the export. */
export type Command =
  | { kind: 'read'; offset: number; length: number; df: boolean }
  | { kind: 'write'; offset: number; length: number; fua: boolean }
  | { kind: 'flush' }
  | { kind: 'trim'; offset: number; length: number; fua: boolean }
  | {
      kind: 'zero'
      offset: number
      length: number
      fua: boolean
      noHole: boolean
      fastZero: boolean
    }
  | { kind: 'cache'; offset: number; length: number }
  | { kind: 'blockStatus'; offset: number; length: number; reqOne: boolean }
  | { kind: 'disconnect' }

/** What a connection has negotiated, which decides what its requests may ask for. */
export interface TransmissionContext {
  sizeBytes: number
  readOnly: boolean
  structuredReplies: boolean
  baseAllocation: boolean
  minBlockBytes: number
}

export type Validated =
  { ok: true; command: Command } | { ok: false; errno: Errno; message: string }

/**
 * The flags each command may carry (before negotiation narrows them further). FUA is valid on
 * every command: we advertise SEND_FUA, and the spec says the server MUST then accept it on all
 * commands (even by ignoring it), as existing clients set it on reads and flushes.
 */
const allowedFlags: Record<number, number> = {
  [Cmd.READ]: CmdFlag.FUA | CmdFlag.DF,
  [Cmd.WRITE]: CmdFlag.FUA,
  [Cmd.DISC]: CmdFlag.FUA,
  [Cmd.FLUSH]: CmdFlag.FUA,
  [Cmd.TRIM]: CmdFlag.FUA,
  [Cmd.CACHE]: CmdFlag.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CmdFlag.FUA | CmdFlag.REQ_ONE,
}

function invalid(message: string): Validated {
  return { ok: false, errno: Errno.EINVAL, message }
}

/** True when the request carries a payload that must be read off the wire (only WRITE does). */
export function hasPayload(header: RequestHeader): boolean {
  return header.type === Cmd.WRITE
}

/**
 * Checks one request against the export and the negotiated options. Returns the command with
 * safe-integer offsets, or the errno and a message for the error reply. Never throws.
 */
export function validateRequest(header: RequestHeader, ctx: TransmissionContext): Validated {
  const allowed = allowedFlags[header.type]
  if (allowed === undefined) return invalid(`unknown command ${header.type}`)
  if ((header.flags & ~allowed) !== 0) {
    return invalid(`flags 0x${header.flags.toString(16)} not valid for command ${header.type}`)
  }
  const flag = (bit: number): boolean => (header.flags & bit) !== 0

  switch (header.type) {
    case Cmd.DISC:
      return { ok: true, command: { kind: 'disconnect' } }
    case Cmd.FLUSH:
      if (header.offset !== 0n || header.length !== 0) {
        return invalid('flush must have offset 0 and length 0')
      }
      return { ok: true, command: { kind: 'flush' } }
    default:
      break
  }

  if (flag(CmdFlag.DF) && !ctx.structuredReplies) {
    return invalid('DF flag needs structured replies')
  }
  if (header.type === Cmd.BLOCK_STATUS && !ctx.baseAllocation) {
    return invalid('block status needs the base:allocation meta context')
  }
  const isWrite =
    header.type === Cmd.WRITE || header.type === Cmd.TRIM || header.type === Cmd.WRITE_ZEROES
  if (isWrite && ctx.readOnly) return { ok: false, errno: Errno.EPERM, message: 'read-only export' }
  if (header.length === 0) return invalid('zero-length request')
  if (
    (header.type === Cmd.READ || header.type === Cmd.WRITE) &&
    header.length > PAYLOAD_BYTES_MAX
  ) {
    return invalid(`payload of ${header.length} bytes exceeds the maximum of ${PAYLOAD_BYTES_MAX}`)
  }

  const end = header.offset + BigInt(header.length)
  if (end > BigInt(ctx.sizeBytes)) {
    const writesData = header.type === Cmd.WRITE || header.type === Cmd.WRITE_ZEROES
    const message = `request [${header.offset}, ${end}) beyond the end of the export (${ctx.sizeBytes} bytes)`
    return writesData ? { ok: false, errno: Errno.ENOSPC, message } : invalid(message)
  }
  const offset = Number(header.offset)
  const length = header.length
  if (ctx.minBlockBytes > 1 && header.type !== Cmd.BLOCK_STATUS && header.type !== Cmd.CACHE) {
    if (offset % ctx.minBlockBytes !== 0 || length % ctx.minBlockBytes !== 0) {
      return invalid(`request not aligned to the minimum block size ${ctx.minBlockBytes}`)
    }
  }

  switch (header.type) {
    case Cmd.READ:
      return { ok: true, command: { kind: 'read', offset, length, df: flag(CmdFlag.DF) } }
    case Cmd.WRITE:
      return { ok: true, command: { kind: 'write', offset, length, fua: flag(CmdFlag.FUA) } }
    case Cmd.TRIM:
      return { ok: true, command: { kind: 'trim', offset, length, fua: flag(CmdFlag.FUA) } }
    case Cmd.CACHE:
      return { ok: true, command: { kind: 'cache', offset, length } }
    case Cmd.WRITE_ZEROES:
      return {
        ok: true,
        command: {
          kind: 'zero',
          offset,
          length,
          fua: flag(CmdFlag.FUA),
          noHole: flag(CmdFlag.NO_HOLE),
          fastZero: flag(CmdFlag.FAST_ZERO),
        },
      }
    case Cmd.BLOCK_STATUS:
      return {
        ok: true,
        command: { kind: 'blockStatus', offset, length, reqOne: flag(CmdFlag.REQ_ONE) },
      }
    default:
      return invalid(`unknown command ${header.type}`)
  }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies

export function encodeSimpleReply(cookie: bigint, errno: number): Buffer {
  const buf = Buffer.alloc(16)
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0)
  buf.writeUInt32BE(errno, 4)
  buf.writeBigUInt64BE(cookie, 8)
  return buf
}

export function encodeChunkHeader(
  cookie: bigint,
  flags: number,
  type: number,
  length: number,
): Buffer {
  const buf = Buffer.alloc(20)
  writeChunkHeader(buf, 0, cookie, flags, type, length)
  return buf
}

function writeChunkHeader(
  buf: Buffer,
  at: number,
  cookie: bigint,
  flags: number,
  type: number,
  length: number,
): void {
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at)
  buf.writeUInt16BE(flags, at + 4)
  buf.writeUInt16BE(type, at + 6)
  buf.writeBigUInt64BE(cookie, at + 8)
  buf.writeUInt32BE(length, at + 16)
}

/** Header and offset of an OFFSET_DATA chunk; the data itself follows on the wire. */
export function encodeDataChunkHeader(
  cookie: bigint,
  offset: number,
  dataLength: number,
  done: boolean,
): Buffer {
  const buf = Buffer.alloc(28)
  writeChunkHeader(buf, 0, cookie, done ? ReplyFlag.DONE : 0, ReplyType.OFFSET_DATA, 8 + dataLength)
  buf.writeBigUInt64BE(BigInt(offset), 20)
  return buf
}

export function encodeHoleChunk(
  cookie: bigint,
  offset: number,
  length: number,
  done: boolean,
): Buffer {
  const buf = Buffer.alloc(32)
  writeChunkHeader(buf, 0, cookie, done ? ReplyFlag.DONE : 0, ReplyType.OFFSET_HOLE, 12)
  buf.writeBigUInt64BE(BigInt(offset), 20)
  buf.writeUInt32BE(length, 28)
  return buf
}

export function encodeErrorChunk(cookie: bigint, errno: number, message: string): Buffer {
  const text = Buffer.from(message, 'utf8').subarray(0, STRING_BYTES_MAX)
  const buf = Buffer.alloc(20 + 6 + text.length)
  writeChunkHeader(buf, 0, cookie, ReplyFlag.DONE, ReplyType.ERROR, 6 + text.length)
  buf.writeUInt32BE(errno, 20)
  buf.writeUInt16BE(text.length, 24)
  text.copy(buf, 26)
  return buf
}

export function encodeDoneChunk(cookie: bigint): Buffer {
  return encodeChunkHeader(cookie, ReplyFlag.DONE, ReplyType.NONE, 0)
}

export interface Extent {
  length: number
  flags: number
}

export function encodeBlockStatusChunk(
  cookie: bigint,
  contextId: number,
  extents: readonly Extent[],
): Buffer {
  const payload = 4 + extents.length * 8
  const buf = Buffer.alloc(20 + payload)
  writeChunkHeader(buf, 0, cookie, ReplyFlag.DONE, ReplyType.BLOCK_STATUS, payload)
  buf.writeUInt32BE(contextId, 20)
  let at = 24
  for (const extent of extents) {
    buf.writeUInt32BE(extent.length, at)
    buf.writeUInt32BE(extent.flags, at + 4)
    at += 8
  }
  return buf
}
