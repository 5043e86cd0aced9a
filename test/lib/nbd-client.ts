/**
 * Test helper: a minimal raw NBD client over node:net, for poking a server with bytes real clients
 * never send. It does exactly what it is told: options and request headers are written as given
 * (any magic, flags, type, offset, length; payloads whole, partial or absent), and replies are
 * parsed without judgement so tests can assert on every field. Every read has a timeout, so a
 * server that hangs fails the test instead of stalling it.
 */
import net from 'node:net'
import { ByteQueue } from '../../src/nbd/byte-queue.js'
import {
  IHAVEOPT,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  ReplyFlag,
  ReplyType,
  Rep,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  BASE_ALLOCATION,
  ClientFlag,
  Info,
  Opt,
} from '../../src/nbd/protocol.js'

export const READ_TIMEOUT_MS = 5_000

export class ClosedError extends Error {
  override name = 'ClosedError'
}

export interface OptionReply {
  option: number
  type: number
  data: Buffer
}

export interface RawRequest {
  magic?: number
  flags?: number
  type: number
  cookie: bigint
  offset: bigint | number
  length: number
}

export type Reply =
  | { kind: 'simple'; cookie: bigint; errno: number; data: Buffer | undefined }
  | { kind: 'chunk'; cookie: bigint; flags: number; type: number; payload: Buffer }

/** All chunks of one structured reply, with the error and the data pulled out. */
export interface StructuredReply {
  cookie: bigint
  chunks: { flags: number; type: number; payload: Buffer }[]
  errno: number
  data: Buffer
}

export interface GoResult {
  sizeBytes: number
  flags: number
  replies: OptionReply[]
}

export class NbdClient {
  private readonly queue = new ByteQueue()
  private waiter: (() => void) | undefined
  private isClosed = false
  readonly closed: Promise<void>

  private constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true)
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk)
      this.waiter?.()
    })
    socket.on('error', () => undefined) // resets are expected in hostile tests; 'close' follows
    this.closed = new Promise((resolve) => {
      socket.once('close', () => {
        this.isClosed = true
        this.waiter?.()
        resolve()
      })
    })
  }

  static async connect(port: number, host = '127.0.0.1'): Promise<NbdClient> {
    const socket = net.connect({ host, port })
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve)
      socket.once('error', reject)
    })
    return new NbdClient(socket)
  }

  /** Connects and completes a fixed-newstyle handshake with GO (and optionally meta contexts). */
  static async open(
    port: number,
    exportName: string,
    options: { structured?: boolean; baseAllocation?: boolean } = {},
  ): Promise<NbdClient> {
    const client = await NbdClient.connect(port)
    await client.greeting()
    client.sendClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
    if (options.structured === true || options.baseAllocation === true) {
      const [ack] = await client.option(Opt.STRUCTURED_REPLY)
      if (ack?.type !== Rep.ACK) throw new Error('structured replies refused')
    }
    if (options.baseAllocation === true) {
      await client.option(Opt.SET_META_CONTEXT, metaContextRequest(exportName, [BASE_ALLOCATION]))
    }
    await client.go(exportName)
    return client
  }

  get isOpen(): boolean {
    return !this.isClosed
  }

  get bufferedBytes(): number {
    return this.queue.length
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes)
  }

  /** Resolves with exactly `n` bytes; rejects with ClosedError or on timeout. */
  async read(n: number, timeoutMs = READ_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs
    while (this.queue.length < n) {
      if (this.isClosed) throw new ClosedError(`closed with ${this.queue.length} of ${n} bytes`)
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.queue.length})`)
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left)
        this.waiter = () => {
          clearTimeout(timer)
          resolve()
        }
      })
      this.waiter = undefined
    }
    return this.queue.take(n)
  }

  /** True if the server closes the connection within the timeout (unread bytes are dropped). */
  async waitClosed(timeoutMs = READ_TIMEOUT_MS): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => {
        resolve(false)
      }, timeoutMs)
    })
    const closed = await Promise.race([this.closed.then(() => true), timeout])
    clearTimeout(timer)
    return closed
  }

  destroy(): void {
    this.socket.destroy()
  }

  // ---- handshake ------------------------------------------------------------------------------

  /** Reads the 18-byte server greeting and returns the handshake flags. */
  async greeting(): Promise<number> {
    const buf = await this.read(18)
    if (buf.readBigUInt64BE(0) !== NBDMAGIC || buf.readBigUInt64BE(8) !== IHAVEOPT) {
      throw new Error(`bad greeting ${buf.toString('hex')}`)
    }
    return buf.readUInt16BE(16)
  }

  sendClientFlags(flags: number): void {
    const buf = Buffer.alloc(4)
    buf.writeUInt32BE(flags >>> 0)
    this.write(buf)
  }

  /** Writes an option header (with any magic and declared length) followed by `data`. */
  sendOption(
    option: number,
    data: Buffer = Buffer.alloc(0),
    header: { magic?: bigint; length?: number } = {},
  ): void {
    const buf = Buffer.alloc(16)
    buf.writeBigUInt64BE(header.magic ?? IHAVEOPT, 0)
    buf.writeUInt32BE(option >>> 0, 8)
    buf.writeUInt32BE((header.length ?? data.length) >>> 0, 12)
    this.write(Buffer.concat([buf, data]))
  }

  async readOptionReply(timeoutMs = READ_TIMEOUT_MS): Promise<OptionReply> {
    const header = await this.read(20, timeoutMs)
    const magic = header.readBigUInt64BE(0)
    if (magic !== OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic ${magic}`)
    const length = header.readUInt32BE(16)
    return {
      option: header.readUInt32BE(8),
      type: header.readUInt32BE(12),
      data: await this.read(length, timeoutMs),
    }
  }

  /** Reads option replies up to the final one (ACK or an error). */
  async readOptionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = []
    for (;;) {
      const reply = await this.readOptionReply()
      replies.push(reply)
      if (reply.type === Rep.ACK || reply.type >= 0x80000000) return replies
    }
  }

  /** Sends one option and returns all its replies, the final one last. */
  async option(option: number, data: Buffer = Buffer.alloc(0)): Promise<OptionReply[]> {
    this.sendOption(option, data)
    return this.readOptionReplies()
  }

  /** NBD_OPT_GO; throws unless it ends in ACK. */
  async go(exportName: string, infos: number[] = []): Promise<GoResult> {
    const replies = await this.option(Opt.GO, infoRequest(exportName, infos))
    const last = replies[replies.length - 1]
    if (last?.type !== Rep.ACK) {
      throw new Error(`GO refused: ${last?.type.toString(16)} ${last?.data.toString()}`)
    }
    const exportInfo = replies.find(
      (r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.EXPORT,
    )
    if (exportInfo === undefined) throw new Error('GO without NBD_INFO_EXPORT')
    return {
      sizeBytes: Number(exportInfo.data.readBigUInt64BE(2)),
      flags: exportInfo.data.readUInt16BE(10),
      replies,
    }
  }

  // ---- transmission ---------------------------------------------------------------------------

  /** Writes a request header exactly as given, then `payload` (which may be shorter than length). */
  sendRequest(request: RawRequest, payload?: Buffer): void {
    const buf = Buffer.alloc(28)
    buf.writeUInt32BE((request.magic ?? REQUEST_MAGIC) >>> 0, 0)
    buf.writeUInt16BE(request.flags ?? 0, 4)
    buf.writeUInt16BE(request.type, 6)
    buf.writeBigUInt64BE(request.cookie, 8)
    buf.writeBigUInt64BE(BigInt(request.offset), 16)
    buf.writeUInt32BE(request.length >>> 0, 24)
    this.write(payload === undefined ? buf : Buffer.concat([buf, payload]))
  }

  /**
   * Reads one reply message: a simple reply (with `dataLength(cookie)` bytes of data when it
   * succeeded and that is non-zero, i.e. a simple read) or one structured chunk.
   */
  async readReply(
    dataLength: (cookie: bigint) => number = () => 0,
    timeoutMs = READ_TIMEOUT_MS,
  ): Promise<Reply> {
    const magic = (await this.read(4, timeoutMs)).readUInt32BE(0)
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12)
      const errno = rest.readUInt32BE(0)
      const cookie = rest.readBigUInt64BE(4)
      const length = errno === 0 ? dataLength(cookie) : 0
      return {
        kind: 'simple',
        cookie,
        errno,
        data: length > 0 ? await this.read(length) : undefined,
      }
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const rest = await this.read(16)
      const length = rest.readUInt32BE(12)
      return {
        kind: 'chunk',
        flags: rest.readUInt16BE(0),
        type: rest.readUInt16BE(2),
        cookie: rest.readBigUInt64BE(4),
        payload: await this.read(length),
      }
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`)
  }

  /** Reads a simple reply and checks its cookie; returns the errno and any read data. */
  async readSimple(
    cookie: bigint,
    dataLength = 0,
    timeoutMs = READ_TIMEOUT_MS,
  ): Promise<{ errno: number; data?: Buffer }> {
    const reply = await this.readReply(() => dataLength, timeoutMs)
    if (reply.kind !== 'simple') throw new Error(`expected a simple reply, got chunk ${reply.type}`)
    if (reply.cookie !== cookie) throw new Error(`cookie ${reply.cookie} instead of ${cookie}`)
    return reply.data === undefined
      ? { errno: reply.errno }
      : { errno: reply.errno, data: reply.data }
  }

  /** Reads chunks of one structured reply until DONE (no other reply may interleave). */
  async readStructured(cookie: bigint): Promise<StructuredReply> {
    const out: StructuredReply = { cookie, chunks: [], errno: 0, data: Buffer.alloc(0) }
    for (;;) {
      const reply = await this.readReply()
      if (reply.kind === 'simple') {
        if (reply.cookie !== cookie) throw new Error(`cookie ${reply.cookie} instead of ${cookie}`)
        out.errno = reply.errno
        return out
      }
      if (reply.cookie !== cookie) throw new Error(`cookie ${reply.cookie} instead of ${cookie}`)
      out.chunks.push({ flags: reply.flags, type: reply.type, payload: reply.payload })
      if ((reply.type & 0x8000) !== 0) out.errno = reply.payload.readUInt32BE(0)
      if (reply.type === ReplyType.OFFSET_DATA) {
        out.data = Buffer.concat([out.data, reply.payload.subarray(8)])
      }
      if ((reply.flags & ReplyFlag.DONE) !== 0) return out
    }
  }
}

/** Payload of NBD_OPT_INFO / NBD_OPT_GO. */
export function infoRequest(name: string, infos: number[] = []): Buffer {
  const nameBytes = Buffer.from(name, 'utf8')
  const buf = Buffer.alloc(4 + nameBytes.length + 2 + infos.length * 2)
  buf.writeUInt32BE(nameBytes.length, 0)
  nameBytes.copy(buf, 4)
  buf.writeUInt16BE(infos.length, 4 + nameBytes.length)
  infos.forEach((info, i) => buf.writeUInt16BE(info, 6 + nameBytes.length + i * 2))
  return buf
}

/** Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
export function metaContextRequest(name: string, queries: string[]): Buffer {
  const parts = [u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length)]
  for (const query of queries) parts.push(u32(Buffer.byteLength(query)), Buffer.from(query))
  return Buffer.concat(parts)
}

export function u32(value: number): Buffer {
  const buf = Buffer.alloc(4)
  buf.writeUInt32BE(value >>> 0)
  return buf
}
